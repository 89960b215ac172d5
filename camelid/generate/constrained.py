"""Output held to a JSON schema or a grammar. llguidance works out, before each token, which tokens may come
next; the sampler draws only among them, so what comes out always parses (unless max_tokens cuts it short).

llguidance rather than xgrammar or outlines-core (bench/constrained.py measures the three on this machine, see
docs/benchmarks.md): it is correct on every walk, has no runtime dependencies (xgrammar requires transformers
and triton, which camelid keeps out of its runtime), reads llama.cpp's GBNF grammars as well as JSON schemas
(outlines-core has regular expressions only), and its mask (~60 µs a token for a 50K vocabulary; xgrammar's is
~10 µs, outlines-core's ~230 µs) releases the GIL, so a batch's masks are computed while the forward runs.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jsonschema
import llguidance
import llguidance.torch
import torch

from camelid.errors import CamelidError
from camelid.tokenizer.tokenizer import HFBackend, PieceBackend, SentencePieceBackend, Tokenizer

# Compact JSON, as OpenAI's structured output writes it: whitespace between tokens is left out, so a model
# cannot wander off into newlines. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar (llguidance's form) and what the request called it, for error messages."""
    grammar: str
    what: str


def check_json_schema(schema):
    """A schema that is not valid JSON Schema is refused with the validator's reason."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError("a JSON schema is an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}") from None


def json_schema(schema, where: str) -> Constraint:
    """Output that is JSON valid under `schema` (a dict, or True for any JSON value)."""
    try:
        check_json_schema(schema)
    except ValueError as exc:
        raise CamelidError(f"{where}: {exc}") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise CamelidError(f"{where}: {exc}") from None
    return Constraint(grammar, where)


def json_object(where: str) -> Constraint:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema({"type": "object"}, where)


def gbnf(text: str, where: str) -> Constraint:
    """A llama.cpp GBNF grammar (its `root` rule is the output)."""
    if not isinstance(text, str) or not text.strip():
        raise CamelidError(f"{where}: the grammar is empty")
    try:
        return Constraint(llguidance.grammar_from("gbnf", text), where)
    except ValueError as exc:
        raise CamelidError(f"{where}: {exc}") from None


def lark(text: str, where: str) -> Constraint:
    """A grammar in llguidance's Lark form (which can hold JSON schemas inline with %json)."""
    return Constraint(llguidance.LLMatcher.grammar_from_lark(text), where)


def vocabulary(tok: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer (each token's bytes), built once per tokenizer (~1 s for 150K tokens)
    and kept on it, so it goes when the tokenizer's model is unloaded."""
    held = tok.__dict__.get("_llguidance")
    if held is None:
        if not tok.eos_ids:
            raise CamelidError("constrained output needs a model with an end-of-sequence token")
        held = tok.__dict__["_llguidance"] = _llg_tokenizer(tok)
    return held


def _llg_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    backend = tok.backend
    if isinstance(backend, HFBackend):  # llguidance reads tokenizer.json itself, pre-tokenizer and decoder too
        return llguidance.LLTokenizer(backend.tok.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_ids))
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenBytes(tok)), eos_token=list(tok.eos_ids))


class _TokenBytes:
    """What llguidance's TokenizerWrapper reads: every token's bytes as it adds them to the text (special
    tokens marked with a leading 0xff, as llguidance expects) and an encoder whose tokens spell exactly the
    bytes it was given (llguidance forces tokens from it)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.eos_token_id = tok.eos_ids[0]
        self.bos_token_id = tok.bos_id
        backend = tok.backend
        if isinstance(backend, SentencePieceBackend):
            sp = backend.sp
            pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
            special = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)}
            byte = {i: int(p[3:5], 16) for i, p in enumerate(pieces) if sp.is_byte(i)}
            space = "\u2581"
        elif isinstance(backend, PieceBackend):
            vocab = backend.vocab
            pieces, special, byte, space = vocab.pieces, set(vocab.special_ids), vocab.byte_of, vocab.space
        else:
            raise CamelidError(f"constrained output: tokenizer backend {type(backend).__name__} is not supported")
        self.special_token_ids = sorted(special)
        self.tokens = [bytes([byte[i]]) if i in byte else b"\xff" + p.encode() if i in special
                       else p.replace(space, " ").encode() for i, p in enumerate(pieces)]
        self.ids = {}
        for i, b in enumerate(self.tokens):
            if i not in special and b:
                self.ids.setdefault(b, i)
        self.longest = max(map(len, self.ids))

    def __call__(self, text: str) -> list[int]:
        want = text.encode("utf-8")
        ids = self.tok.encode(text, bos=False)
        got = b"".join(self.tokens[i] for i in ids)
        if got == want:
            return ids
        if got == b" " + want and ids and self.tokens[ids[0]] == b" ":  # SentencePiece's prefix space
            return ids[1:]
        return self._longest_match(want)

    def _longest_match(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                tid = self.ids.get(data[i:i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                return out  # a byte no token spells: llguidance forces no further
        return out


class Guide:
    """One request's place in its grammar: the tokens allowed next, and the tokens taken so far."""

    def __init__(self, constraint: Constraint, tok: Tokenizer):
        self.constraint = constraint
        vocab = vocabulary(tok)
        self.n_vocab = vocab.vocab_size
        self.matcher = llguidance.LLMatcher(vocab, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise CamelidError(f"{constraint.what}: {self.matcher.get_error()}")

    def accept(self, token: int):
        if not self.matcher.consume_token(token):
            raise self.error or CamelidError(f"{self.constraint.what}: token {token} does not follow the grammar")

    @property
    def error(self) -> CamelidError | None:
        """Why the grammar cannot go on (a parser limit, say), if it cannot."""
        if self.matcher.is_error():
            return CamelidError(f"{self.constraint.what}: {self.matcher.get_error()}")
        return None

    @property
    def done(self) -> bool:
        """Nothing may follow: the grammar's output is complete."""
        return self.matcher.is_stopped()


def check(constraint: Constraint, tok: Tokenizer):
    """A grammar that does not compile is the request's error, found before it is queued."""
    Guide(constraint, tok)


_EXECUTOR: llguidance.LLExecutor | None = None
_POOL = ThreadPoolExecutor(1, thread_name_prefix="camelid-mask")


def allowed_tokens(guides: list[Guide | None], width: int) -> torch.Tensor | None:
    """(rows, width) bool: the tokens each row may take next (every token where a row has no guide); None when
    no row has a guide. Logit columns past the tokenizer's vocabulary (an embedding's padding) are never
    allowed to a guided row. A guide that failed (its `error`) allows nothing: its row must not be sampled."""
    global _EXECUTOR
    rows = [(g.matcher, i) for i, g in enumerate(guides) if g is not None]
    if not rows:
        return None
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    n_vocab = min(guides[i].n_vocab for _, i in rows)
    bits = llguidance.torch.allocate_token_bitmask(len(guides), n_vocab)
    llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, rows, bits)  # a failed row's mask is empty
    guided = [i for _, i in rows]
    unpacked = ((bits[guided, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().flatten(1)
    out = torch.ones(len(guides), width, dtype=torch.bool)
    out[guided] = False
    keep = min(width, n_vocab)
    out[guided, :keep] = unpacked[:, :keep]
    return out


def allowed_tokens_soon(guides: list[Guide | None], width: int) -> Future:
    """allowed_tokens computed on another thread (llguidance releases the GIL), to overlap the forward pass."""
    return _POOL.submit(allowed_tokens, guides, width)
