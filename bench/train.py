"""Training speed: camelid's trainer against transformers' LlamaForCausalLM, same configuration, same run.

`--size 17M` (the CPU default): hidden 384, 6 layers, 6 heads, FFN 1024, vocab 8192, sequence 256, batch 8.
`--size 124M` (for a GPU): hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, sequence 1024, batch 8.
AdamW (weight decay on matrices only; fused on CUDA for both), gradient clipping at 1.0, in fp32 and in bf16
autocast. camelid runs its real trainer (`camelid.train.trainer.train`) on token shards; transformers runs the
textbook loop on the same windows. Prints one JSON line per dtype with tokens/s of both, the ratio, camelid's
MFU and, on CUDA, both peaks of allocated GPU memory.

    python bench/train.py [--threads 2] [--dtypes fp32,bf16] [--steps 30] [--no-compile]
                         [--compile-mode auto|default|max-autotune-no-cudagraphs]
                         [--device cuda --size 124M]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from camelid.data.shards import TokenShards, write_shards  # noqa: E402
from camelid.train.config import TrainConfig  # noqa: E402
from camelid.train.loop import param_groups  # noqa: E402
from camelid.train.trainer import train  # noqa: E402

SIZES = {"17M": (dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024, max_seq_len=256), 8192, 256, 8),
         "124M": (dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, max_seq_len=1024), 32000,
                  1024, 8)}
SHAPE, VOCAB, SEQ, BATCH = SIZES["17M"]
WARMUP = 5


def make_shards(folder: Path, steps: int) -> Path:
    rng = np.random.default_rng(0)
    doc_len = 2000
    docs = (rng.integers(0, VOCAB - 1, doc_len).tolist() for _ in range(max(200, BATCH * SEQ * steps // doc_len + 1)))
    write_shards(docs, folder, VOCAB - 1, VOCAB)
    return folder


def peak_gpu_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    mb = torch.cuda.max_memory_allocated() / 2 ** 20
    torch.cuda.reset_peak_memory_stats()
    return round(mb)


def run_camelid(data: Path, out: Path, dtype: str, steps: int, threads: int, compile: bool,
                device: str, compile_mode: str = "default") -> tuple[float, float]:
    tokenizer = out.parent / "tokenizer.json"  # the trainer needs one to write the final model
    if not tokenizer.exists():
        from tokenizers import Tokenizer, models

        vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
        Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tokenizer))
    cfg = TrainConfig(out_dir=str(out), data=str(data), tokenizer=str(tokenizer), model=dict(SHAPE), seq_len=SEQ,
                      micro_batch=BATCH, max_steps=steps, warmup_steps=2, dtype=dtype, threads=threads,
                      log_every=1, ckpt_every=10 ** 6, eval_every=10 ** 6, compile=compile, weight_decay=0.1,
                      device=device, compile_mode=compile_mode)
    train(cfg)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][WARMUP:]
    return statistics.median(r["tokens_per_s"] for r in rows), statistics.median(r["mfu"] for r in rows)


def run_transformers(data: Path, dtype: str, steps: int, device: str) -> float:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=SHAPE["dim"], num_hidden_layers=SHAPE["n_layers"],
                         num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
                         intermediate_size=SHAPE["ffn_dim"], vocab_size=VOCAB, max_position_embeddings=SEQ,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    device_type = torch.device(device).type
    shards = TokenShards(data)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = (t.to(device) for t in shards.batch(step * BATCH, BATCH, SEQ, 1337))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(BATCH * SEQ / t for t in times[WARMUP:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="camelid without torch.compile")
    ap.add_argument("--compile-mode", default="auto",
                    help="camelid's torch.compile mode; auto: max-autotune-no-cudagraphs in bf16, default in fp32 "
                         "(what measured fastest on a CPU: max-autotune picks slower fp32 kernels, 1139 against "
                         "1496-1628 tok/s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=list(SIZES), default="17M")
    args = ap.parse_args()
    global SHAPE, VOCAB, SEQ, BATCH
    SHAPE, VOCAB, SEQ, BATCH = SIZES[args.size]
    torch.set_num_threads(args.threads)
    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp) / "shards", args.steps)
        for dtype in args.dtypes.split(","):
            mode = args.compile_mode if args.compile_mode != "auto" else (
                "max-autotune-no-cudagraphs" if dtype == "bf16" else "default")
            peak_gpu_mb(args.device)
            ours, mfu = run_camelid(data, Path(tmp) / f"run-{dtype}", dtype, args.steps, args.threads,
                                    not args.no_compile, args.device, mode)
            our_mb = peak_gpu_mb(args.device)
            theirs = run_transformers(data, dtype, args.steps, args.device)
            their_mb = peak_gpu_mb(args.device)
            gpu = {"device": torch.cuda.get_device_name(), "camelid_peak_mb": our_mb, "transformers_peak_mb": their_mb,
                   "memory_ratio": round(our_mb / their_mb, 3)} if our_mb else {"device": "cpu"}
            print(json.dumps({"bench": "train", "params": args.size, "dtype": dtype, "threads": args.threads,
                              "seq_len": SEQ, "batch": BATCH, "compile": not args.no_compile and mode,
                              "camelid_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                              "ratio": round(ours / theirs, 3), "camelid_mfu": round(mfu, 3), **gpu,
                              "torch": torch.__version__, "transformers": tf.__version__}), flush=True)


if __name__ == "__main__":
    main()
