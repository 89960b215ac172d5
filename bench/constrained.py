"""Constrained decoding: the per-token cost of a JSON-schema mask, llguidance (camelid's choice) against
xgrammar and outlines-core on the same vocabulary and schema, in the same run; and what a schema costs camelid's
own generation per token.

Each library compiles the schema for GPT-2's 50,257-token vocabulary (../shared/data/tokenizers), then walks
the tokens of a document valid under it, computing the full mask before each token and checking that the
document's next token is allowed (`correct`: every step, and the end accepted). Timings are the median
per-token mask time over --rounds walks. camelid's end-to-end figure decodes with a random-weight 1-layer
model of that vocabulary with and without the schema, same number of tokens, and reports the difference per
token. Prints one JSON line; the ratio is xgrammar's or outlines-core's time over llguidance's.

    python bench/constrained.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2_tokenizer.json"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace of the Analytical Engine", "age": 36, "email": "ada@engine.org",
            "tags": ["admin", "user"], "address": {"city": "London", "zip": "W1 1AA"}}


def vocabulary():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(GPT2))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    pieces = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    return tok, [bytes(byte_of[c] for c in p) for p in pieces]


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def allowed(bits: torch.Tensor, token: int) -> bool:
    return bool((int(bits.view(-1)[token // 32]) >> (token % 32)) & 1)


def walk_llguidance(tok, ids):
    import llguidance
    import llguidance.torch

    from camelid.generate.constrained import JSON_OPTIONS

    t0 = time.perf_counter()
    vocab = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=50256)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_OPTIONS)
    matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    bits = llguidance.torch.allocate_token_bitmask(1, tok.get_vocab_size())

    def step(token):
        llguidance.torch.fill_next_token_bitmask(matcher, bits)
        ok = token is None or allowed(bits, token)
        if token is not None:
            matcher.consume_token(token)
        return ok

    return compile_s, step, lambda: allowed(bits, 50256)


def walk_xgrammar(tok, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    _, encoded = vocabulary()
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=[50256])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                             separators=(", ", ": "))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bits = xgr.allocate_token_bitmask(1, info.vocab_size)

    def step(token):
        matcher.fill_next_token_bitmask(bits)
        ok = token is None or allowed(bits, token)
        if token is not None:
            matcher.accept_token(token)
        return ok

    return compile_s, step, lambda: allowed(bits, 50256)


def walk_outlines(tok, ids):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    _, encoded = vocabulary()
    tokens: dict[bytes, list[int]] = {}
    for i, b in enumerate(encoded):
        if i != 50256:
            tokens.setdefault(b, []).append(i)
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")  # its separators: ", " and ": " allowed
    index = Index(regex, Vocabulary(50256, tokens))
    guide = Guide(index)
    compile_s = time.perf_counter() - t0
    bits = torch.zeros((1, (len(encoded) + 31) // 32), dtype=torch.int32)

    def step(token):
        guide.write_mask_into(bits.data_ptr(), bits.numel(), bits.element_size())
        ok = token is None or allowed(bits, token)
        if token is not None:
            guide.advance(token)
        return ok

    return compile_s, step, lambda: allowed(bits, 50256)


def measure(walk, tok, ids, rounds):
    per_token, compile_times, correct = [], [], True
    for _ in range(rounds):
        compile_s, step, eos_allowed = walk(tok, ids)
        t0 = time.perf_counter()
        for token in ids:
            correct &= step(token)
        step(None)
        per_token.append((time.perf_counter() - t0) / (len(ids) + 1))
        correct &= eos_allowed()
        compile_times.append(compile_s)
    return {"mask_us_per_token": round(statistics.median(per_token) * 1e6, 1),
            "compile_ms": round(statistics.median(compile_times) * 1e3, 1), "correct": bool(correct)}


def camelid_overhead(rounds):
    from tokenizers import Tokenizer as HFTokenizer

    from camelid.formats.loaded import LoadedModel
    from camelid.generate import constrained
    from camelid.generate.generate import Stats, generate
    from camelid.generate.sampling import SamplingParams
    from camelid.model.config import ModelConfig
    from camelid.model.transformer import Transformer
    from camelid.tokenizer.tokenizer import HFBackend, Tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50304, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=128, max_seq_len=1024)
    lm = LoadedModel(Transformer(cfg).eval(), Tokenizer(HFBackend(HFTokenizer.from_file(str(GPT2))),
                                                        eos_ids=[50256], add_bos=False))
    rule = constrained.json_schema(SCHEMA, "schema")
    constrained.check(rule, lm.tokenizer)  # the vocabulary is built once per tokenizer, outside the timing
    plain, held = [], []
    for seed in range(rounds):
        params = SamplingParams(temperature=1.0, seed=seed)
        stats = Stats()
        t0 = time.perf_counter()
        out = generate(lm, ["Describe a person:"], 300, params, stats=stats, constraint=rule)[0]
        n = stats.generated_tokens
        held.append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        generate(lm, ["Describe a person:"], n, params)  # the same number of tokens, unconstrained
        plain.append((time.perf_counter() - t0) / n)
        json.loads(out.text) if out.finish_reason == "stop" else None
    return {"plain_ms_per_token": round(statistics.median(plain) * 1e3, 3),
            "constrained_ms_per_token": round(statistics.median(held) * 1e3, 3),
            "overhead_ms_per_token": round((statistics.median(held) - statistics.median(plain)) * 1e3, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, _ = vocabulary()
    ids = tok.encode(json.dumps(DOCUMENT)).ids
    result = {"bench": "constrained-json-schema", "vocab": tok.get_vocab_size(), "tokens": len(ids),
              "threads": args.threads}
    walks = {"llguidance": walk_llguidance, "xgrammar": walk_xgrammar, "outlines_core": walk_outlines}
    for name, walk in walks.items():
        try:
            result[name] = measure(walk, tok, ids, args.rounds)
        except ImportError as exc:  # the bench extra (pip install camelid[bench]) brings the peers
            result[name] = {"error": f"not installed: {exc}"}
    base = result["llguidance"]["mask_us_per_token"]
    for name in ("xgrammar", "outlines_core"):
        if "mask_us_per_token" in result[name]:
            result[f"{name}_over_llguidance"] = round(result[name]["mask_us_per_token"] / base, 2)
    result["camelid"] = camelid_overhead(args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
