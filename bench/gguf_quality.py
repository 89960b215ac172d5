"""Perplexity of one model at llama.cpp's quantizations, as camelid and as llama.cpp itself run them.

Exports a camelid model as F32 GGUF, has llama.cpp quantize it (Q8_0, Q4_0, Q4_K_M by default) and scores
every file with llama.cpp's perplexity protocol (n_ctx chunks, second half of each scored) in both engines on
the same tokens. Prints one JSON line per file; compare with `camelid eval --protocol llamacpp` on camelid's
own int8/int4/GPTQ folders (README, Quantization).

    python bench/gguf_quality.py --model out/gutenberg/run/model --text held-out.txt [--ctx 256]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
from pathlib import Path

import numpy as np

from camelid.eval.perplexity import llamacpp_perplexity
from camelid.formats.gguf_export import export_gguf
from camelid.formats.load import load_model

FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def llama_cpp_perplexity(path: Path, tokens: list[int], n_ctx: int, bos: int | None) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    first, nll = n_ctx // 2, []
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        llm.reset()
        llm.eval(chunk)
        logits = np.array(llm.scores[:n_ctx], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll += [-logp[j - 1, chunk[j]] for j in range(first + 1, n_ctx)]
    return math.exp(float(np.mean(nll)))


def main():
    import llama_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--quants", default="Q8_0,Q4_0,Q4_K_M")
    ap.add_argument("--workdir", default="/tmp/camelid-gguf-quality")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    lm = load_model(args.model)
    f32 = export_gguf(lm, args.workdir, "f32", name="model")
    tok = lm.tokenizer
    tokens = tok.encode(text, bos=tok.add_bos)
    bos = tok.bos_id if tok.add_bos else None
    files = {"F32": f32}
    for quant in args.quants.split(","):
        path = Path(args.workdir) / f"model-llama-{quant}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = FTYPES[quant], 2
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) == 0
        files[quant] = path
    for quant, path in files.items():
        ours = llamacpp_perplexity(load_model(path), text, args.ctx)
        print(json.dumps({"bench": "gguf_quality", "file": quant, "bytes": path.stat().st_size,
                          "camelid_perplexity": round(ours["perplexity"], 3),
                          "llama_cpp_perplexity": round(llama_cpp_perplexity(path, tokens, args.ctx, bos), 3),
                          "chunks": ours["chunks"], "n_ctx": args.ctx}), flush=True)


if __name__ == "__main__":
    main()
