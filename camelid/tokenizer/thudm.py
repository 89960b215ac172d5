"""THUDM's ChatGLM tokenizers, as their own tokenization_chatglm.py computes them (the releases ship that Python
code, not a tokenizer.json).

- ChatGLM-6B (the first ChatGLM): a SentencePiece model (ice_text.model) read after newlines become <n>, tabs
  <|tab|> and runs of 2 to 80 spaces <|blank_n|>; ids are the model's pieces shifted by its image tokens (20000
  in the first release, none in the last). A prompt ends with [gMASK] <sop>: the reply is the block GLM fills
  in at the mask.
- ChatGLM2 and ChatGLM3: a SentencePiece model (tokenizer.model) with [MASK] [gMASK] [sMASK] sop eop and
  ChatGLM3's role tokens numbered after its pieces. A prompt starts with [gMASK] sop; a chat message is its
  role token, then its metadata line and its text, each encoded on its own (build_single_message).
- GLM-4 (ChatGLM4Tokenizer): tiktoken's byte-level BPE from the ranks in tokenizer.model, split first by its
  pattern, special tokens numbered after the ranks; a prompt starts with [gMASK] <sop>. It is built here as a
  `tokenizers` BPE, each merge ranked as the token it makes, which is tiktoken's rule."""

from __future__ import annotations

import re
from pathlib import Path

from camelid.errors import CamelidError
from camelid.tokenizer.tokenizer import Tokenizer, load_sentencepiece

SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MAX_BLANK = 80
VOCAB_FILE = "ice_text.model"


def _preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class ChatGLM6BBackend:
    def __init__(self, sp, image_tokens: int):
        self.sp, self.offset = sp, image_tokens
        self.specials = [s for s in SPECIALS + ["<pad>", "<unk>", "</s>"] if self._piece_id(s) is not None]
        self._skip = {self._piece_id(s) for s in self.specials}

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    @property
    def vocab_size(self) -> int:
        return self.offset + self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self.sp.encode(_preprocess(text))]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.sp.id_to_piece(i - self.offset) for i in ids
                  if self.offset <= i < self.vocab_size and i - self.offset not in self._skip]
        return _postprocess(self.sp.decode_pieces(pieces))

    def token_id(self, piece: str) -> int | None:
        i = self._piece_id(piece)
        return None if i is None else i + self.offset

    def special_tokens(self) -> list[str]:
        return [s for s in self.specials if s not in ("<unk>",)]


def load_chatglm6b_tokenizer(folder: Path, tcfg: dict, mcfg: dict) -> Tokenizer:
    """A ChatGLM-6B folder's tokenizer: its ice_text.model, the image-token offset its tokenizer_config.json
    gives, EOS <eop>, and [gMASK] <sop> at the end of every prompt."""
    sp = load_sentencepiece(folder / VOCAB_FILE)
    image_tokens = tcfg.get("num_image_tokens", 20000)  # THUDM's default, for the configs that leave it out
    if not isinstance(image_tokens, int) or isinstance(image_tokens, bool) or image_tokens < 0:
        raise CamelidError(f"{folder / 'tokenizer_config.json'}: num_image_tokens must be a non-negative integer")
    backend = ChatGLM6BBackend(sp, image_tokens)
    ids = {name: backend.token_id(name) for name in ("[gMASK]", "<sop>", "<eop>")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise CamelidError(f"{folder / VOCAB_FILE}: no {missing[0]} piece (not ChatGLM-6B's vocabulary)")
    for key, piece in (("gmask_token_id", "[gMASK]"), ("bos_token_id", "<sop>")):
        if mcfg.get(key) is not None and mcfg[key] != ids[piece]:
            raise CamelidError(f"{folder / 'config.json'}: {key}={mcfg[key]} but {piece} is token {ids[piece]} in "
                               f"{VOCAB_FILE} with num_image_tokens={image_tokens}")
    eos = mcfg.get("eos_token_id", ids["<eop>"])
    return Tokenizer(backend, None, [eos], True, None, {"eos_token": "<eop>"},
                     prompt_end=[ids["[gMASK]"], ids["<sop>"]])


def chatglm6b_tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json as THUDM's release writes it (its code reads it, and camelid does)."""
    return {"tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "remove_space": False, "do_lower_case": False, "num_image_tokens": tok.backend.offset,
            "padding_side": "left"}


GLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM_VOCAB_FILE = "tokenizer.model"


class ChatGLM3Backend:
    """ChatGLM2's and ChatGLM3's vocabulary: the SentencePiece pieces, then GLM_SPECIALS and ChatGLM3's ROLES
    (ChatGLM2's tokenizer stops before them; the ids are the same)."""

    def __init__(self, sp):
        self.sp = sp
        self.specials = {name: sp.get_piece_size() + i for i, name in enumerate(GLM_SPECIALS + ROLES)}
        # "sop" is a word too: it is the special token only right after a mask token, where THUDM puts it
        self.special_regex = re.compile("(" + "|".join([re.escape(r) for r in ROLES + GLM_SPECIALS[:3]]
                                                       + [r"(?<=\])sop"]) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.specials)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_after(self, text: str, special: str | None) -> list[int]:
        """After a role token, the metadata line and the message are encoded apart, as THUDM's chat input is."""
        if special in ROLES and "\n" in text:
            head, rest = text.split("\n", 1)
            return self.sp.encode(head + "\n") + (self.sp.encode(rest) if rest else [])
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        n = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if 0 <= i < n and not self.sp.is_control(i)])

    def token_id(self, piece: str) -> int | None:
        if piece in self.specials:
            return self.specials[piece]
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def special_tokens(self) -> list[str]:
        return list(self.specials)


def load_chatglm3_tokenizer(folder: Path, tcfg: dict, gen: dict, mcfg: dict) -> Tokenizer:
    """A ChatGLM2 or ChatGLM3 folder's tokenizer: prompts start with [gMASK] sop; a reply ends at EOS or, for
    ChatGLM3, where the model starts the next turn (<|user|>, <|observation|>), as its chat() stops; its chat
    format is FastChat's for the release its name says (ChatGLM3's when it says neither)."""
    from camelid.tokenizer.fastchat_formats import fastchat_template

    backend = ChatGLM3Backend(load_sentencepiece(folder / GLM_VOCAB_FILE))
    sp = backend.sp
    name = " ".join(str(v) for v in (tcfg.get("name_or_path"), mcfg.get("_name_or_path"), folder.name) if v).lower()
    release = "chatglm2" if "chatglm2" in name else "chatglm3"
    eos = gen.get("eos_token_id", mcfg.get("eos_token_id", sp.eos_id()))
    eos_ids = list(eos) if isinstance(eos, list) else [eos]
    if release == "chatglm3":
        eos_ids += [backend.specials[r] for r in ("<|user|>", "<|observation|>") if backend.specials[r] not in eos_ids]
    return Tokenizer(backend, None, eos_ids, True, fastchat_template(release)[0], {"eos_token": "</s>"},
                     prompt_start=[backend.specials["[gMASK]"], backend.specials["sop"]])


GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one base64 token and its rank a line."""
    import base64
    import binascii

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CamelidError(f"{path}: not a tiktoken file (lines of a base64 token and its rank)") from None
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CamelidError(f"{path}:{n}: not a tiktoken line (a base64 token and its rank)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CamelidError(f"{path}: the ranks are not 0..{len(ranks) - 1}, one each")
    return ranks


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what byte-level vocabularies are written in)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiktoken_bpe(ranks: dict[bytes, int], pattern: str, specials: list[str]):
    """A `tokenizers` BPE computing what tiktoken computes with these ranks: a merge for every split of a token
    into two tokens, ranked by the token it makes; specials numbered after the ranks."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    chars = _byte_chars()
    vocab = {"".join(chars[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in vocab.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(rank, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    tok = HFTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def load_glm4_tokenizer(folder: Path, tcfg: dict, gen: dict, mcfg: dict) -> Tokenizer:
    """A GLM-4 folder's ChatGLM4Tokenizer: its tiktoken ranks, [gMASK] <sop> starting each prompt, replies that
    stop at <|endoftext|>, <|user|> or <|observation|> (its generation config's), its chat template."""
    from tokenizers import processors

    from camelid.tokenizer.tokenizer import HFBackend

    ranks = read_tiktoken_ranks(folder / GLM_VOCAB_FILE)
    special = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
    bpe = tiktoken_bpe(ranks, GLM4_PATTERN, GLM4_SPECIALS)
    # what its code adds to an encoded text, so that a tokenizer.json written from this one does the same
    bpe.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", special["[gMASK]"]), ("<sop>", special["<sop>"])])
    backend = HFBackend(bpe)
    eos = gen.get("eos_token_id", [special[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")])
    return Tokenizer(backend, None, list(eos) if isinstance(eos, list) else [eos], True, None,
                     {"eos_token": "<|endoftext|>"}, prompt_start=[special["[gMASK]"], special["<sop>"]])
