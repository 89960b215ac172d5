"""The tokenizer stored in GGUF metadata, as llama.cpp reads each vocabulary type: `llama` (SentencePiece-style
scores, SPM), `gpt2` (byte-level BPE with its pre-tokenizer), `bert` (WordPiece, WPM) and `t5` (SentencePiece's
unigram model with its precompiled normalizer, UGM)."""

from __future__ import annotations

from camelid.errors import CamelidError
from camelid.tokenizer import pretokenizers
from camelid.tokenizer.piece_vocab import PieceVocab
from camelid.tokenizer.tokenizer import HFBackend, Tokenizer, check_token_ids, piece_tokenizer

UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

_KEY_TYPES = {"tokenizer.ggml.model": str, "tokenizer.ggml.pre": str, "tokenizer.chat_template": str,
              "tokenizer.ggml.tokens": [str], "tokenizer.ggml.merges": [str], "tokenizer.ggml.scores": [float],
              "tokenizer.ggml.token_type": [int], "tokenizer.ggml.bos_token_id": int,
              "tokenizer.ggml.eos_token_id": int, "tokenizer.ggml.eot_token_id": int,
              "tokenizer.ggml.eom_token_id": int, "tokenizer.ggml.unknown_token_id": int,
              "tokenizer.ggml.add_bos_token": bool, "tokenizer.ggml.add_space_prefix": bool,
              "tokenizer.ggml.remove_extra_whitespaces": bool, "tokenizer.ggml.precompiled_charsmap": [int],
              "tokenizer.ggml.normalizer.lowercase": bool, "tokenizer.ggml.normalizer.strip_accents": bool}


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
    if model == "t5" and not eos_ids and len(tokens) > 1:
        eos_ids = [1]  # llama.cpp's default for T5's vocabulary, as SentencePiece numbers it
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
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model == "gemma4" or (model == "gpt2" and pre in pretokenizers.SPM_STYLE):
        # llama.cpp turns Gemma 4's BOS on whatever the file says
        add_bos = model == "gemma4" or meta.get("tokenizer.ggml.add_bos_token", False)
        tok = _spm_style_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], types)
        specials = {"bos_token": tokens[bos]} if bos is not None else {}
        return Tokenizer(HFBackend(tok), bos, eos_ids, add_bos and bos is not None, template, specials)
    if model == "gpt2":
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        tok = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], types, pre, source)
        specials = {"bos_token": tokens[bos]} if bos is not None else {}
        if eos_ids:
            specials["eos_token"] = tokens[eos_ids[0]]
        return Tokenizer(HFBackend(tok), bos, eos_ids, add_bos and bos is not None, template, specials)
    if model in ("bert", "t5"):
        build = _wordpiece if model == "bert" else _unigram
        add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "bert")
        return Tokenizer(HFBackend(build(tokens, types, meta, source)), bos, eos_ids, add_bos and bos is not None,
                         template, {})
    raise CamelidError(f"{source}: tokenizer.ggml.model={model!r} is not supported (llama, gpt2, bert, t5, gemma4)")


def _spm_style_bpe(tokens, merges, types):
    """llama.cpp's BPE on raw UTF-8 (Gemma 4, Sarvam, Granite's multilingual embedder): spaces become '▁', the
    text splits only at newlines (a run of them taken whole where it is a token), merges go by rank, and a
    piece with no token falls back to its bytes' <0xXX> tokens."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _specials(tok, tokens, types)


def _specials(tok, tokens, types):
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tok


def _wordpiece(tokens, types, meta, source):
    """llama.cpp's WPM: BERT's normalizer (lowercase and accents stripped unless the metadata says otherwise),
    words split at whitespace, punctuation and CJK characters, each matched longest-first. The file marks a
    word's first piece with a leading '▁' where BERT's vocabulary marks the others with '##'."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    lowercase = meta.get("tokenizer.ggml.normalizer.lowercase", True)
    strip_accents = meta.get("tokenizer.ggml.normalizer.strip_accents", lowercase)
    vocab = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        piece = t if ty in (UNKNOWN, CONTROL, USER_DEFINED) else t[1:] if t.startswith("▁") else "##" + t
        vocab.setdefault(piece, i)
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 100)]
    tok = HFTokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=1 << 30))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return _specials(tok, tokens, types)


def _unigram(tokens, types, meta, source):
    """llama.cpp's UGM (T5's SentencePiece unigram model): the precompiled character map normalizes, runs of
    whitespace become one '▁' before each word, and the best-scoring segmentation of the whole text wins
    (user-defined pieces scoring 0, an unknown character the lowest score less 10)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = [(t, 0.0 if ty == USER_DEFINED else float(sc)) for t, ty, sc in zip(tokens, types, scores)]
    unk = meta.get("tokenizer.ggml.unknown_token_id", next((i for i, t in enumerate(types) if t == UNKNOWN), None))
    tok = HFTokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=False))
    steps = []
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap:
        steps.append(normalizers.Precompiled(bytes(charsmap)))
    if meta.get("tokenizer.ggml.remove_extra_whitespaces", True):
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    prefix = "always" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    return _specials(tok, tokens, types)


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
