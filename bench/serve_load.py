"""Load test for `camelid serve`: 1, 4 and 8 concurrent clients on loopback, for a fixed time each.

Builds a TinyLlama-1.1B-shaped camelid folder (random weights, the Llama 2 tokenizer from ../shared),
starts `camelid serve` on 127.0.0.1, and drives streaming completions from client threads. Prints one
JSON line per concurrency level (requests/s, generated tokens/s, p50/p95 latency and time to first token,
errors) and a final line with the 8-client/1-client throughput ratio. Goal: at least 3x.

    python bench/serve_load.py [--duration 20] [--dtype bf16] [--max-tokens 32] [--keep-model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
PROMPT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told stories "
          "to the children every evening. One day")


def build_model(folder: Path, dtype: str):
    import torch

    from camelid.formats.load import save_native
    from camelid.formats.loaded import LoadedModel
    from camelid.model.config import preset
    from camelid.model.transformer import Transformer
    from camelid.tokenizer.tokenizer import SentencePieceBackend, Tokenizer, load_sentencepiece

    torch.manual_seed(0)
    model = Transformer(preset("tinyllama-1.1b"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).eval()
    tok = Tokenizer(SentencePieceBackend(load_sentencepiece(TOKENIZER)), 1, [2], True, None,
                    {"bos_token": "<s>", "eos_token": "</s>"})
    save_native(LoadedModel(model, tok, "raw"), folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(base: str, max_tokens: int, out: list, errors: list):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                errors.append(r.status_code)
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                elif first is None and data["choices"] and data["choices"][0]["text"]:
                    first = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        errors.append(type(exc).__name__)
        return
    out.append((time.perf_counter() - t0, first or 0.0, tokens))


def run_level(base: str, clients: int, duration: float, max_tokens: int) -> dict:
    results, errors = [], []
    deadline = time.perf_counter() + duration

    def client():
        while time.perf_counter() < deadline:  # bounded in time; each request bounded by max_tokens
            one_request(base, max_tokens, results, errors)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    return {"bench": "serve_load", "clients": clients, "seconds": round(elapsed, 1), "requests": len(results),
            "requests_per_s": round(len(results) / elapsed, 3),
            "generated_tokens_per_s": round(sum(r[2] for r in results) / elapsed, 2),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "mean_ttft_s": round(statistics.mean(ttft), 3) if ttft else None, "errors": len(errors)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-model", default=None, help="folder to build the model in (reused if present)")
    args = ap.parse_args()
    folder = Path(args.keep_model or tempfile.mkdtemp(prefix="camelid-serve-bench-")) / "tinyllama-random"
    if not (folder / "camelid.json").exists():
        build_model(folder, args.dtype)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "camelid.cli", "serve", str(folder), "--port", str(port),
                               "--dtype", args.dtype, "--threads", str(args.threads), "--max-batch", "8"],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become ready")
        for clients in (1, 8):  # warm-up: compile the decode kernels for every batch shape
            run_level(base, clients, 1.0, 4)
        levels = {}
        for clients in (1, 4, 8):
            levels[clients] = run_level(base, clients, args.duration, args.max_tokens)
            print(json.dumps({**levels[clients], "dtype": args.dtype, "model": "tinyllama-1.1b-shape"}), flush=True)
        ratio = levels[8]["generated_tokens_per_s"] / max(levels[1]["generated_tokens_per_s"], 1e-9)
        print(json.dumps({"bench": "serve_load", "summary": True, "tokens_per_s_1_client":
                          levels[1]["generated_tokens_per_s"], "tokens_per_s_8_clients":
                          levels[8]["generated_tokens_per_s"], "ratio_8_vs_1": round(ratio, 2),
                          "goal": 3.0, "errors": sum(v["errors"] for v in levels.values())}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
