"""The serving engine's paged KV cache, measured: chunked prefill, prefix reuse, memory, and KV storage types.

Runs camelid's Engine in-process (no HTTP: what is measured is the scheduling) on bench/finetune.py's LLaMA
shape with random weights (hidden 1024, 8 layers, 4 KV heads; --layers to change), 2 threads. Each case
runs both ways in the same process and prints one JSON line with both figures and their ratio:
- `chunked_prefill`: 4 streams decode while a 2,000-token prompt arrives; the p95 gap between their tokens
  from its arrival until its first token, prefilled in --chunk-token chunks between their decode steps
  against in one piece (the engine before chunking).
- `prefix_reuse`: requests that share a 1,500-token system prompt and differ in a short question; time to
  first token with the prefix cache against without (--no-prefix-cache), after one request warmed it.
- `kv_memory`: the KV memory the pool actually held at its peak in the run above against what one
  preallocated (slots x context) cache takes.
- `kv_types` (with --ppl-model, a trained model): perplexity on held-out text when keys and values are read
  back from the cache as f16, bf16 and q8_0, against f32; every position from the second on attends to
  stored keys and values, as decoding does.

    python bench/serve_kv.py [--threads 2] [--chunk 256] [--ppl-model out/shakespeare/run/model --ppl-text F]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from pathlib import Path

import torch

from camelid.formats.loaded import LoadedModel
from camelid.generate.decoding import prepare_for_decoding
from camelid.generate.sampling import SamplingParams
from camelid.model.config import ModelConfig
from camelid.model.kv_cache import PagedKVCache
from camelid.model.transformer import Transformer
from camelid.serve.engine import Engine, KVBudget, Request
from camelid.tokenizer.tokenizer import SentencePieceBackend, Tokenizer, load_sentencepiece

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
TEXT = REPO.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"


def build(layers: int) -> LoadedModel:
    cfg = ModelConfig(arch="llama", dim=1024, n_layers=layers, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                      vocab_size=32000, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = prepare_for_decoding(model.eval())
    tok = Tokenizer(SentencePieceBackend(load_sentencepiece(TOKENIZER)), 1, [2], True, None,
                    {"bos_token": "<s>", "eos_token": "</s>"})
    return LoadedModel(model, tok, "raw")


def text_tokens(lm: LoadedModel, n: int, offset: int = 0) -> list[int]:
    ids = lm.tokenizer.encode(TEXT.read_text()[offset:offset + 8 * n], bos=False)
    return ids[:n]


class Stream:
    """A request whose token times are recorded."""

    def __init__(self, prompt, max_tokens):
        self.times, self.done = [], threading.Event()
        self.req = Request(prompt, SamplingParams(temperature=1.0, seed=1), max_tokens, [], emit=self.emit)

    def emit(self, kind, _value):
        if kind == "text":
            self.times.append(time.perf_counter())
        if kind in ("done", "error"):
            self.done.set()


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.95 * len(xs)))] if xs else None


def chunked_prefill(lm, chunk: int) -> dict:
    long = text_tokens(lm, 2000, offset=200_000)
    out = {}
    for name, size in (("chunked", chunk), ("whole", 1 << 20)):
        engine = Engine(lm, max_batch=5, kv=KVBudget(tokens=5 * 2400), ctx_size=2400, prefill_chunk=size)
        try:
            streams = [Stream(text_tokens(lm, 32, offset=1000 * i), 400) for i in range(4)]
            for s in streams:
                engine.submit(s.req)
            while min(len(s.times) for s in streams) < 8:  # all four decoding
                time.sleep(0.01)
            arriving = Stream(long, 4)
            arrived = time.perf_counter()
            engine.submit(arriving.req)
            arriving.done.wait(600)
            first = arriving.times[0]
            gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:]) if b > arrived and a < first]
            out[name] = {"p95_gap_s": round(p95(gaps), 4), "ttft_s": round(first - arrived, 3),
                         "chunks": engine.metrics.prefill_chunks}
            for s in streams:
                s.req.cancel()
        finally:
            engine.shutdown()
    return {"bench": "serve_kv", "case": "chunked_prefill", "prompt_tokens": len(long), "chunk": chunk,
            "p95_gap_chunked_s": out["chunked"]["p95_gap_s"], "p95_gap_whole_s": out["whole"]["p95_gap_s"],
            "ratio": round(out["whole"]["p95_gap_s"] / out["chunked"]["p95_gap_s"], 2),
            "ttft_chunked_s": out["chunked"]["ttft_s"], "ttft_whole_s": out["whole"]["ttft_s"]}


def prefix_reuse(lm, requests: int = 4) -> tuple[dict, dict]:
    system = text_tokens(lm, 1500, offset=400_000)
    questions = [text_tokens(lm, 12, offset=600_000 + 500 * i) for i in range(requests + 1)]
    out, peak = {}, {}
    for name, reuse in (("reuse", True), ("no_reuse", False)):
        engine = Engine(lm, max_batch=4, kv=KVBudget(tokens=4 * 1600), ctx_size=1600, prefix_cache=reuse)
        try:
            ttfts, most = [], 0
            for i, q in enumerate(questions):
                s = Stream(system + q, 8)
                t0 = time.perf_counter()
                engine.submit(s.req)
                while not s.done.is_set():
                    most = max(most, engine.pool.used)
                    time.sleep(0.005)
                if i:  # the first fills the cache
                    ttfts.append(s.times[0] - t0)
            out[name] = statistics.median(ttfts)
            peak[name] = most * engine.cache.nbytes // engine.pool.n_blocks
            prealloc = engine.cache.nbytes
        finally:
            engine.shutdown()
    reuse = {"bench": "serve_kv", "case": "prefix_reuse", "system_tokens": len(system),
             "ttft_reuse_s": round(out["reuse"], 3), "ttft_no_reuse_s": round(out["no_reuse"], 3),
             "ratio": round(out["no_reuse"] / out["reuse"], 2), "goal": 5.0}
    memory = {"bench": "serve_kv", "case": "kv_memory", "peak_held_mb": round(peak["no_reuse"] / 1e6, 1),
              "preallocated_mb": round(prealloc / 1e6, 1), "ratio": round(peak["no_reuse"] / prealloc, 3)}
    return reuse, memory


@torch.inference_mode()
def kv_types(model_dir: str, text_path: str, ctx: int = 256, windows: int = 40) -> list[dict]:
    from camelid.formats.load import load_model

    lm = load_model(model_dir)
    model, cfg = lm.model, lm.model.cfg
    ids = lm.tokenizer.encode(Path(text_path).read_text()[-200_000:], bos=False)
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(min(windows, len(ids) // ctx))]
    rows = []
    for kv_type in ("f32", "f16", "bf16", "q8_0"):
        nll, n = 0.0, 0
        cache = PagedKVCache(cfg.n_layers, ctx // 16, 16, cfg.n_kv_heads, cfg.head_dim, model.dtype, model.device,
                             kv_type)
        table = cache.rows(torch.arange(ctx // 16)[None])
        for chunk in chunks:
            x = torch.tensor([chunk])
            logits = torch.cat([model(x[:, :1], 0, table), model(x[:, 1:], 1, table)], dim=1)[0]
            logp = torch.log_softmax(logits[ctx // 2 - 1:-1].double(), -1)  # llama.cpp's second half
            nll -= logp.gather(-1, x[0, ctx // 2:, None]).sum().item()
            n += ctx - ctx // 2
        rows.append({"kv_type": kv_type, "ppl": math.exp(nll / n), "bytes": cache.nbytes})
    base = rows[0]
    return [{"bench": "serve_kv", "case": "kv_types", "kv_type": r["kv_type"], "ppl": round(r["ppl"], 4),
             "ppl_f32": round(base["ppl"], 4), "ppl_change_pct": round(100 * (r["ppl"] / base["ppl"] - 1), 3),
             "memory_ratio": round(r["bytes"] / base["bytes"], 3), "model": model_dir, "ctx": ctx,
             "scored_tokens": n} for r in rows[1:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--ppl-model", default=None)
    ap.add_argument("--ppl-text", default=str(TEXT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = build(args.layers)
    print(json.dumps(chunked_prefill(lm, args.chunk)), flush=True)
    for row in prefix_reuse(lm):
        print(json.dumps(row), flush=True)
    if args.ppl_model:
        for row in kv_types(args.ppl_model, args.ppl_text):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
