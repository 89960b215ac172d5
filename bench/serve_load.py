"""The race: `camelid serve` against llama.cpp's own `llama-server`, same GGUF file, same threads, same clients.

Builds (once, cached in .cache/llama-server) `llama-server` from the llama.cpp that the llama-cpp-python
0.3.36 source distribution carries, CPU only; writes a TinyLlama-1.1B-shaped Q4_0 GGUF with random weights
and the Llama 2 tokenizer (from ../shared); runs each server in turn with --threads (2) and as many slots as
clients (llama-server: -np clients, continuous batching, a unified KV cache of clients x --slot-ctx tokens;
camelid: --parallel clients, --ctx-size --slot-ctx), and drives it with 1, 4, 8 and 16 streaming clients over
the OpenAI API for --duration seconds each. Scenarios:
- `plain`: a short prompt, --max-tokens tokens each;
- `shared_prefix`: a 1,500-token system prompt before a short question that differs per request (prefix
  reuse), each server also measured with its prompt cache off (camelid --no-prefix-cache, llama-server
  --no-cache-prompt) for the TTFT ratio;
- `mixed`: one client in four sends a 1,000-token prompt, the others short ones (chunked prefill).
Prints one JSON line per (scenario, clients) with both servers' aggregate generated tokens/s, TTFT p50/p95,
inter-token gap p95, errors and peak RSS, and the ratios; a final line sums up against the goals
(>= 1.3x llama-server's tokens/s at 8 and 16 clients, TTFT p95 and peak memory no worse, zero errors).

    python bench/serve_load.py [--duration 20] [--clients 1 4 8 16] [--scenarios plain shared_prefix mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "llama-server"
TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
TEXT = REPO.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
PROMPT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told stories "
          "to the children every evening. One day")


def build_llama_server() -> Path:
    """llama.cpp's server from the llama-cpp-python 0.3.36 sdist, CPU only, built once."""
    binary = CACHE / "llama.cpp" / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / "llama_cpp_python-0.3.36.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python==0.3.36", "-d", str(CACHE)], check=True)
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(CACHE), "--strip-components", "2",
                    "llama_cpp_python-0.3.36/vendor/llama.cpp"], check=True)
    src = CACHE / "llama.cpp"
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", str(os.cpu_count())],
                   check=True)
    return binary


def build_gguf() -> Path:
    """A TinyLlama-1.1B-shaped model with random weights as Q4_0 GGUF (cached)."""
    path = CACHE / "tinyllama-random" / "tinyllama-random-Q4_0.gguf"
    if path.exists():
        return path
    import torch

    from camelid.formats.gguf_export import export_gguf
    from camelid.formats.loaded import LoadedModel
    from camelid.model.config import preset
    from camelid.model.transformer import Transformer
    from camelid.tokenizer.tokenizer import SentencePieceBackend, Tokenizer, load_sentencepiece

    torch.manual_seed(0)
    model = Transformer(preset("tinyllama-1.1b"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tok = Tokenizer(SentencePieceBackend(load_sentencepiece(TOKENIZER)), 1, [2], True, None,
                    {"bos_token": "<s>", "eos_token": "</s>"})
    return export_gguf(LoadedModel(model.eval(), tok, "raw"), path.parent, "q4_0", name="tinyllama-random")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, gguf: Path, clients: int, slot_ctx: int, threads: int, cache: bool):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if kind == "camelid":
            cmd = [sys.executable, "-m", "camelid.cli", "serve", str(gguf), "--port", str(self.port),
                   "--threads", str(threads), "--parallel", str(clients), "--ctx-size", str(slot_ctx),
                   "--max-queue", "256"] + ([] if cache else ["--no-prefix-cache"])
        else:
            cmd = [str(build_llama_server()), "-m", str(gguf), "--port", str(self.port), "-t", str(threads),
                   "-tb", str(threads), "-np", str(clients), "-c", str(clients * slot_ctx), "-cb", "--no-webui",
                   "-kvu"] + ([] if cache else ["--no-cache-prompt"])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.peak_rss = 0
        self._watch = threading.Thread(target=self._rss, daemon=True)
        self._watch.start()
        for _ in range(1200):
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"{kind} exited: {' '.join(cmd)}")
            time.sleep(0.25)
        raise SystemExit(f"{kind} did not become ready")

    def _rss(self):
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(base: str, prompt: str, max_tokens: int, out: list, errors: list, seed: int):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], None
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                errors.append(r.status_code)
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        errors.append(type(exc).__name__)
        return
    if not times:
        errors.append("no tokens")
        return
    out.append({"ttft": times[0] - t0, "gaps": [b - a for a, b in zip(times, times[1:])],
                "tokens": tokens if tokens is not None else len(times)})


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None


def drive(base: str, clients: int, duration: float, prompt_for, max_tokens: int) -> dict:
    results, errors = [], []
    deadline = time.perf_counter() + duration

    def client(i):
        n = 0
        while time.perf_counter() < deadline:
            one_request(base, prompt_for(i, n), max_tokens, results, errors, seed=1000 * i + n)
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    return {"tokens_per_s": round(sum(r["tokens"] for r in results) / elapsed, 2), "requests": len(results),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "gap_p95_s": pct([g for r in results for g in r["gaps"]], 0.95), "errors": len(errors)}


def prompts(scenario: str):
    text = TEXT.read_text()
    # ~1,500 Llama 2 tokens of Shakespeare as a system prompt; ~1,000 for a long prompt
    system, long = text[:5200], text[100_000:103_600]
    questions = [text[200_000 + 300 * k:200_000 + 300 * k + 60] for k in range(1000)]

    def for_request(i, n):
        if scenario == "shared_prefix":
            return system + "\n\nQuestion: " + questions[(37 * i + n) % len(questions)]
        if scenario == "mixed" and i % 4 == 3:
            return long + questions[(37 * i + n) % len(questions)]
        return PROMPT
    return for_request


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--scenarios", nargs="+", default=["plain", "shared_prefix", "mixed"])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slot-ctx", type=int, default=2048)
    args = ap.parse_args()
    gguf = build_gguf()
    build_llama_server()
    summary = {}
    for scenario in args.scenarios:
        caches = (True, False) if scenario == "shared_prefix" else (True,)
        for clients in args.clients:
            row = {"bench": "serve_load", "scenario": scenario, "clients": clients, "model": "tinyllama-1.1b-q4_0",
                   "threads": args.threads}
            for kind in ("camelid", "llama_server"):
                for cache in caches:
                    server = Server(kind if kind == "camelid" else "llama-server", gguf, clients, args.slot_ctx,
                                    args.threads, cache)
                    try:
                        feed = prompts(scenario)
                        drive(server.base, clients, min(5.0, args.duration), feed, 4)  # warm: kernels, caches
                        got = drive(server.base, clients, args.duration, feed, args.max_tokens)
                    finally:
                        server.stop()
                    got["peak_rss_mb"] = round(server.peak_rss / 1e6)
                    name = kind if cache else f"{kind}_no_cache"
                    row.update({f"{name}_{k}": v for k, v in got.items()})
            row["tokens_per_s_ratio"] = round(row["camelid_tokens_per_s"] / max(row["llama_server_tokens_per_s"],
                                                                               1e-9), 2)
            row["ttft_p95_ratio"] = round(row["camelid_ttft_p95_s"] / max(row["llama_server_ttft_p95_s"], 1e-9), 2)
            row["peak_rss_ratio"] = round(row["camelid_peak_rss_mb"] / max(row["llama_server_peak_rss_mb"], 1), 2)
            if scenario == "shared_prefix":
                row["camelid_prefix_ttft_speedup"] = round(row["camelid_no_cache_ttft_p50_s"]
                                                           / max(row["camelid_ttft_p50_s"], 1e-9), 2)
            print(json.dumps(row), flush=True)
            summary[(scenario, clients)] = row
    goals = [r for (s, c), r in summary.items() if s == "plain" and c in (8, 16)]
    print(json.dumps({"bench": "serve_load", "summary": True,
                      "tokens_per_s_ratio_8_16": [r["tokens_per_s_ratio"] for r in goals], "goal_ratio": 1.3,
                      "ttft_p95_ratio_8_16": [r["ttft_p95_ratio"] for r in goals],
                      "peak_rss_ratio_8_16": [r["peak_rss_ratio"] for r in goals],
                      "errors": sum(v for r in summary.values() for k, v in r.items() if k.endswith("_errors"))}),
          flush=True)


if __name__ == "__main__":
    main()
