"""The tokenizer stored in GGUF metadata: `llama` (SentencePiece-style scores) or `gpt2` (byte-level BPE)."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.tokenizer import pretokenizers
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.tokenizer import HFBackend, Tokenizer, check_token_ids, piece_tokenizer

CONTROL, USER_DEFINED = 3, 4

_KEY_TYPES = {"tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
              "tokenizer.ggml.tokens": [str], "tokenizer.ggml.merges": [str], "tokenizer.ggml.scores": [float],
              "tokenizer.ggml.token_type": [int], "tokenizer.ggml.bos_token_id": int,
              "tokenizer.ggml.eos_token_id": int, "tokenizer.ggml.eot_token_id": int,
              "tokenizer.ggml.eom_token_id": int, "tokenizer.ggml.unknown_token_id": int,
              "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.add_space_prefix": bool}


def _check_types(meta: dict, source: str):
    def ok(value, kind):
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))

    for key, kind in _KEY_TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        good = isinstance(value, list) and all(ok(v, kind[0]) for v in value) if isinstance(kind, list) \
            else ok(value, kind)
        if not good:
            name = f"array of {kind[0].__name__}" if isinstance(kind, list) else kind.__name__
            raise CamelidError(f"{source}: metadata key {key!r} should be {name}")
    n = len(meta.get("tokenizer.ggml.tokens") or [])
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in meta and len(meta[key]) != n:
            raise CamelidError(f"{source}: {key} has {len(meta[key])} entries for {n} tokens")
    for key in ("bos", "eos", "eot", "eom", "unknown"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and not 0 <= tid < n:
            raise CamelidError(f"{source}: tokenizer.ggml.{key}_token_id={tid} is not one of the {n} tokens")


def gguf_tokenizer(meta: dict, source: str = "GGUF") -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise CamelidError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.model/tokens)")
    _check_types(meta, source)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in meta]
    eos_ids = list(dict.fromkeys(eos_ids))
    check_token_ids(source, len(tokens), bos, eos_ids)
    template = meta.get("tokenizer.chat_template")
    if model == "llama":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        specials = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
        vocab = PieceVocab(list(tokens), list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)),
                           add_space_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                           unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0), special_ids=specials)
        return piece_tokenizer(vocab, bos, eos_ids, add_bos, template)
    if model == "gpt2":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        tok = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], types,
                              meta.get("tokenizer.ggml.pre", "default"), source)
        specials = {"bos_token": tokens[bos]} if bos is not None else {}
        if eos_ids:
            specials["eos_token"] = tokens[eos_ids[0]]
        return Tokenizer(HFBackend(tok), bos, eos_ids, add_bos and bos is not None, template, specials)
    raise CamelidError(f"{source}: tokenizer.ggml.model={model!r} is not supported (llama, gpt2)")


def _byte_level_bpe(tokens, merges, types, pre: str, source: str):
    """llama.cpp's BPE for this `tokenizer.ggml.pre`: its regexes split the text in turn (each keeping what falls
    between its matches), the pieces are mapped to bytes as GPT-2 does, then merged."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if pre in pretokenizers.UNSUPPORTED or pre not in pretokenizers.NAMES:
        known = ", ".join(sorted(pretokenizers.NAMES))
        raise CamelidError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (camelid reads {known})")
    kind, ignore_merges = pretokenizers.NAMES[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pretokenizers.REGEXES[kind]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tok
