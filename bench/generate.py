"""Prompt and decode speed: camelid against transformers' generate, same weights, same run, same threads.

Builds a TinyLlama-1.1B-shaped model with random weights (hidden 2048, 22 layers, 32 heads, 4 KV heads,
FFN 5632, vocab 32000), then for each dtype measures prefill tokens/s on a 256-token prompt and decode
tokens/s for 64 greedy tokens after it. Prints one JSON line per dtype with both figures and the ratios.

    python bench/generate.py [--threads 2] [--dtypes fp32,bf16] [--new-tokens 64] [--prompt-tokens 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from camelid.formats.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from camelid.formats.load import build_model  # noqa: E402
from camelid.generate.decoding import prepare_for_decoding  # noqa: E402
from camelid.generate.generate import generate_tokens  # noqa: E402
from camelid.generate.sampling import SamplingParams  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tinyllama():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                         intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    # to_empty leaves the RoPE buffers uninitialised; rebuild that module from the config.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval(), cfg


def hf_runner(model, ids):
    def run(n):
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0
    return run


def camelid_runner(model, ids):
    prompt = ids[0].tolist()

    def run(n):
        t0 = time.perf_counter()
        for _ in generate_tokens(model, [prompt], n, SamplingParams.greedy()):
            pass
        return time.perf_counter() - t0
    return run


def measure(runners: dict, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Best-of-`repeats` timings, taking turns between the engines so machine noise hits both alike.
    Prefill = time to the first token; decode = the extra time for the other new_tokens - 1.
    The two phases are timed apart: a prefill measured right after a long decode run is skewed by it."""
    for run in runners.values():
        run(2)  # warm-up (and, the first time, compiling camelid's decode kernels)
    first = {k: float("inf") for k in runners}
    full = {k: float("inf") for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            first[name] = min(first[name], run(1))
    for _ in range(repeats):
        for name, run in runners.items():
            full[name] = min(full[name], run(new_tokens))
    return {name: (prompt_tokens / first[name], (new_tokens - 1) / (full[name] - first[name])) for name in runners}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="measure camelid without its decode kernel")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per engine")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if len(dtypes) > 1:  # one process per dtype, as a user runs one model; compiled kernels do not mix
        import subprocess
        import sys

        for name in dtypes:
            child = ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                     "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--dtypes", name,
                     *["--no-compile"] * args.no_compile]
            subprocess.run([sys.executable, __file__, *child], check=True)
        return
    torch.set_num_threads(args.threads)
    import transformers as tf

    hf_model, hf_cfg = tinyllama()
    ids = torch.randint(0, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for name in dtypes:
        dtype = DTYPES[name]
        hf_model = hf_model.to(dtype)
        cfg = config_from_hf(hf_cfg.to_dict())
        ours = build_model(cfg, state_dict_from_hf(dict(hf_model.state_dict()), cfg, "bench"), "bench",
                           dtype=dtype)
        prepare_for_decoding(ours, not args.no_compile)
        with torch.inference_mode():
            check = torch.equal(ours(ids[:, :16]).argmax(-1), hf_model(ids[:, :16]).logits.argmax(-1))
            res = measure({"camelid": camelid_runner(ours, ids), "transformers": hf_runner(hf_model, ids)},
                          args.prompt_tokens, args.new_tokens, args.repeats)
            (c_pre, c_dec), (h_pre, h_dec) = res["camelid"], res["transformers"]
        print(json.dumps({
            "bench": "generate", "model": "tinyllama-1.1b-shape", "dtype": name, "threads": args.threads,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "camelid_prefill_tok_s": round(c_pre, 2), "transformers_prefill_tok_s": round(h_pre, 2),
            "prefill_ratio": round(c_pre / h_pre, 3),
            "camelid_decode_tok_s": round(c_dec, 2), "transformers_decode_tok_s": round(h_dec, 2),
            "decode_ratio": round(c_dec / h_dec, 3), "same_argmax": check, "repeats": args.repeats,
            "torch": torch.__version__, "transformers": tf.__version__}), flush=True)
        del ours
        gc.collect()


if __name__ == "__main__":
    main()
