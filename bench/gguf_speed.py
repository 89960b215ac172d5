"""GGUF speed: camelid against llama.cpp (llama-cpp-python) on the same files, same threads, same run.

Builds a model of a given shape with random weights (--shape: TinyLlama-1.1B by default: hidden 2048, 22 layers,
32 heads, 4 KV heads, FFN 5632; or Qwen2.5-0.5B's, Gemma-3-1B's, or a small Mixtral's: 8 experts, top 2), with
the LLaMA-2 SentencePiece vocabulary (padded to the shape's vocabulary), writes it as F16 GGUF with camelid, has
llama.cpp quantize it to Q4_0, Q8_0 and Q4_K_M, then measures both engines on each file:
- prompt tokens/s: one 256-token prompt from an empty cache;
- decode tokens/s: 64 greedy tokens after a short prompt (time from the first token to the last).
Best of --repeats, the engines taking turns. One JSON line per file with both figures and the ratios.

    python bench/gguf_speed.py [--shape tinyllama] [--threads 2] [--quants Q4_0,Q8_0,Q4_K_M]
                               [--workdir /tmp/camelid-gguf-bench]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch

from camelid.formats.gguf_export import export_gguf
from camelid.formats.load import load_model
from camelid.formats.loaded import LoadedModel
from camelid.generate.decoding import prepare_for_decoding
from camelid.generate.generate import generate_tokens
from camelid.generate.sampling import SamplingParams
from camelid.model.config import ModelConfig, preset
from camelid.model.transformer import Transformer, rope_tables
from camelid.tokenizer.tokenizer import load_tokenizer_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q4_1": 3, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}
SHAPES = {"tinyllama": "tinyllama-1.1b", "qwen2.5-0.5b": "qwen2.5-0.5b", "gemma-3-1b": "gemma-3-1b",
          # a Mixtral of 8 experts (top 2) at a size this machine runs: 0.7B parameters, 0.2B active
          "mixtral-small": dict(arch="llama", dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                                vocab_size=32000, max_seq_len=4096, rope_theta=1e6, n_experts=8, n_experts_used=2)}


def build_f16(workdir: Path, shape: str) -> Path:
    path = workdir / f"{shape}-F16.gguf"
    if path.exists():
        return path
    spec = SHAPES[shape]
    cfg = preset(spec) if isinstance(spec, str) else ModelConfig(**spec)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    for name, table in rope_tables(cfg).items():  # buffers, which to_empty left uninitialised
        setattr(model, name, table)
    tok = load_tokenizer_file(SHARED / "tokenizers" / "llama2_tokenizer.model")
    lm = LoadedModel(model.eval().requires_grad_(False), tok, "raw", [], shape)
    return export_gguf(lm, workdir, "f16", name=shape)


def llama_quantize(src: Path, dst: Path, ftype: str):
    import llama_cpp

    if dst.exists():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    tmp = dst.with_name(dst.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")
    tmp.rename(dst)


def camelid_runners(path: Path, prompt: list[int], short: list[int], new_tokens: int, compile: bool):
    lm = load_model(path)
    model = prepare_for_decoding(lm.model, compile)

    def prefill():
        cache = model.new_kv_cache(1, len(prompt) + 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompt]), 0, cache, last_only=True)
        return time.perf_counter() - t0

    def decode():
        stamps = []
        with torch.inference_mode():
            for _ in generate_tokens(model, [short], new_tokens, SamplingParams.greedy()):
                stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    return prefill, decode, lm


def llama_cpp_runners(path: Path, prompt: list[int], short: list[int], new_tokens: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def prefill():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t0

    def decode():
        llm.reset()
        stamps = []
        for _ in llm.generate(short, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    return prefill, decode, llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quants", default="Q4_0,Q8_0,Q4_K_M")
    ap.add_argument("--workdir", default="/tmp/camelid-gguf-bench")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="camelid without its compiled decode kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = build_f16(workdir, args.shape)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=gen).tolist()
    short = [1] + prompt[:7]
    for quant in args.quants.split(","):
        path = workdir / f"{args.shape}-{quant}.gguf"
        llama_quantize(f16, path, quant)
        engines = {"camelid": camelid_runners(path, prompt, short, args.new_tokens, not args.no_compile),
                   "llama.cpp": llama_cpp_runners(path, prompt, short, args.new_tokens, args.threads)}
        for prefill, decode, _ in engines.values():  # warm-up: first-touch pages, compile kernels
            prefill()
            decode()
        best = {name: [float("inf"), float("inf")] for name in engines}
        for _ in range(args.repeats):
            for name, (prefill, decode, _) in engines.items():
                best[name][0] = min(best[name][0], prefill())
                best[name][1] = min(best[name][1], decode())
        c_pre, c_dec = args.prompt_tokens / best["camelid"][0], 1 / best["camelid"][1]
        l_pre, l_dec = args.prompt_tokens / best["llama.cpp"][0], 1 / best["llama.cpp"][1]
        print(json.dumps({
            "bench": "gguf_speed", "shape": args.shape, "file": path.name, "bytes": path.stat().st_size,
            "threads": args.threads,
            "camelid_prompt_tok_s": round(c_pre, 2), "llama_cpp_prompt_tok_s": round(l_pre, 2),
            "prompt_ratio": round(c_pre / l_pre, 3),
            "camelid_decode_tok_s": round(c_dec, 2), "llama_cpp_decode_tok_s": round(l_dec, 2),
            "decode_ratio": round(c_dec / l_dec, 3), "repeats": args.repeats, "torch": torch.__version__}),
            flush=True)
        del engines


if __name__ == "__main__":
    main()
