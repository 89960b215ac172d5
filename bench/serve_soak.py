"""Soak test for `camelid serve`: many clients for a long time, random lengths, disconnects and mistakes.

Starts `camelid serve` (the bundled stories260K by default, --model for another) with a small KV budget so
requests wait for blocks, and runs --clients (16) client threads for --minutes (10). Each request picks at
random: a prompt of 1 to ~400 tokens (sometimes sharing a long prefix), max_tokens 1 to 200, streaming or
not, n of 1 or 2, a client that disconnects after a few chunks or a few hundred milliseconds, and now and
then a request with a mistake in it (which must be a 4xx). Prints one JSON line: requests by status, 5xx
count, disconnects, the server's RSS a quarter of the way in and at the end, the pool at the end (blocks used
and reserved must be back at 0) and the tracebacks in the server's log. Goal: zero 5xx, memory flat (end RSS
within 10% of the early one), nothing logged.

    python bench/serve_soak.py [--minutes 10] [--clients 16] [--model models/stories260K]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
WORDS = ("once upon a time there was a little girl named lily she loved to play outside in the park with her "
         "big red dog and the sun was hot so they went to the lake").split()
SHARED = " ".join(WORDS * 6)
MISTAKES = [{"max_tokens": -3}, {"temperature": "hot"}, {"n": 99}, {"top_logprobs": 5}, {"stop": 7},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one(base: str, rng: random.Random, tally: collections.Counter):
    words = rng.randint(1, 120)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    body = {"prompt": (SHARED + " " if rng.random() < 0.4 else "") + text, "max_tokens": rng.randint(1, 200),
            "temperature": rng.choice([0.0, 0.8, 1.2]), "stream": rng.random() < 0.6, "n": rng.choice([1, 1, 1, 2]),
            "seed": rng.randint(0, 1 << 30)}
    if rng.random() < 0.05:
        body.update(rng.choice(MISTAKES))
    leave = rng.random() < 0.2
    try:
        if body["stream"]:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
                tally[r.status_code] += 1
                limit = rng.randint(1, 5) if leave else None
                for i, _ in enumerate(r.iter_lines()):
                    if limit is not None and i >= limit:
                        tally["disconnected"] += 1
                        return
        else:
            timeout = rng.uniform(0.05, 0.5) if leave else 600
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=timeout)
            tally[r.status_code] += 1
    except httpx.TimeoutException:
        tally["disconnected"] += 1
    except httpx.HTTPError as exc:
        tally[type(exc).__name__] += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default=str(REPO / "models" / "stories260K"))
    ap.add_argument("--kv-memory", default="4MB")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("a+")  # a file (appended to), never a pipe nobody reads: a full one blocks the server
    server = subprocess.Popen([sys.executable, "-m", "camelid.cli", "serve", args.model, "--port", str(port),
                               "--parallel", "8", "--max-queue", "256", "--kv-memory", args.kv_memory,
                               "--threads", "2"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.DEVNULL, stderr=log)
    def log_text() -> str:
        log.seek(0)
        return log.read()

    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tally: collections.Counter = collections.Counter()
        lock = threading.Lock()
        deadline = time.time() + args.minutes * 60

        def client(seed):
            rng = random.Random(seed)
            while time.time() < deadline:
                local = collections.Counter()
                one(base, rng, local)
                with lock:
                    tally.update(local)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.minutes * 60 / 4)
        early = rss(server.pid)
        for t in threads:
            t.join()
        stopped, gauge, slowest = time.time(), {}, 0.0
        while time.time() - stopped < 300:  # the server drains what the clients left behind
            t0 = time.time()
            metrics = httpx.get(f"{base}/metrics", timeout=300).text
            slowest = max(slowest, time.time() - t0)
            gauge = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(camelid_\w+) ([\d.e+-]+)$", metrics,
                                                                        re.M)}
            if gauge["camelid_running_requests"] == 0 and gauge["camelid_queue_depth"] == 0:
                break
            time.sleep(0.5)
        drained = time.time() - stopped
        late = rss(server.pid)
        fives = sum(v for k, v in tally.items() if isinstance(k, int) and k >= 500)
        print(json.dumps({"bench": "serve_soak", "minutes": args.minutes, "clients": args.clients,
                          "requests": sum(v for k, v in tally.items() if isinstance(k, int)),
                          "by_status": {str(k): v for k, v in sorted(tally.items(), key=str)}, "5xx": fives,
                          "rss_early_mb": round(early / 1e6), "rss_end_mb": round(late / 1e6),
                          "rss_ratio": round(late / early, 3), "kv_blocks_used_end": gauge["camelid_kv_blocks_used"],
                          "kv_blocks_reserved_end": gauge["camelid_kv_blocks_reserved"],
                          "running_end": gauge["camelid_running_requests"],
                          "engine_failed_requests": gauge["camelid_requests_failed_total"],
                          "drain_s": round(drained, 1), "slowest_metrics_s": round(slowest, 2),
                          "server_log_tracebacks": log_text().count("Traceback"),
                          "goal": "0 5xx, rss_ratio <= 1.1, pool back at 0, no traceback logged"}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if "Traceback" in log_text():
            print(log_text()[-4000:], file=sys.stderr)


if __name__ == "__main__":
    main()
