"""Peak resident memory and time to the first token when opening a GGUF file: camelid against llama.cpp.

Each engine runs in a fresh process that opens the file and produces one token from an 8-token prompt. The peak
is the kernel's own high-water mark (VmHWM); "over baseline" subtracts what the process held before opening
the file (Python, torch or llama.cpp's library). Prints one JSON line with both engines and the ratios to the
file size. Uses the files bench/gguf_speed.py builds.

    python bench/gguf_memory.py [--file /tmp/camelid-gguf-bench/tinyllama-Q4_0.gguf] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(engine: str, path: str, threads: int):
    prompt = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    if engine == "camelid":
        import torch

        from camelid.formats.load import load_model

        torch.set_num_threads(threads)
        base = _status("VmRSS")
        t0 = time.perf_counter()
        lm = load_model(path)
        loaded = time.perf_counter()
        with torch.inference_mode():
            lm.model(torch.tensor([prompt]), last_only=True).argmax()
    else:
        import llama_cpp

        base = _status("VmRSS")
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, verbose=False)
        loaded = time.perf_counter()
        llm.eval(prompt)
    first = time.perf_counter()
    print(json.dumps({"base": base, "peak": _status("VmHWM"), "load_s": loaded - t0, "first_token_s": first - t0}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="/tmp/camelid-gguf-bench/tinyllama-Q4_0.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.file, args.threads)
    size = Path(args.file).stat().st_size
    out = {"bench": "gguf_memory", "file": Path(args.file).name, "bytes": size}
    for engine in ("camelid", "llama.cpp"):
        r = subprocess.run([sys.executable, __file__, "--file", args.file, "--threads", str(args.threads),
                            "--child", engine], capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        key = engine.replace(".", "_")
        out[f"{key}_peak_rss_over_file"] = round(m["peak"] / size, 3)
        out[f"{key}_peak_over_baseline_over_file"] = round((m["peak"] - m["base"]) / size, 3)
        out[f"{key}_load_s"] = round(m["load_s"], 2)
        out[f"{key}_first_token_s"] = round(m["first_token_s"], 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
