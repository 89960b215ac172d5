"""LoRA fine-tuning speed and memory: camelid against Hugging Face PEFT + transformers, same run.

A LLaMA-shaped base (hidden 1024, 8 layers, 16 heads, 4 KV heads, FFN 2816, vocab 32000; ~160M parameters,
random weights), LoRA rank 8 / alpha 16 on q and v, AdamW 3e-4, batches of 4 Alpaca samples masked by
camelid's template code and padded to the same 256 tokens for both. Each engine runs in its own process so
its peak resident memory (ru_maxrss) is its own; the engines take turns for --rounds processes each, and
each engine's fastest round and largest peak are reported. Then one more process runs both engines, taking
turns step by step on the same batches (--paired-steps): the median of those pairs' ratios is the speed ratio
least moved by a shared machine's noise, which slows whichever process it lands on. In bf16 each engine does
what its fine-tuning does by default: camelid keeps the frozen base in bf16 (the fp32 adapter trains under
autocast); PEFT + transformers load the base in fp32 and train under autocast, as Trainer(bf16=True) does.
Prints one JSON line per dtype with both tokens/s, both peaks and the ratios.

`--quantize-base int4` (or int8) runs camelid as QLoRA (`quantize_base` in a finetune config: the blocks'
weights frozen in 4 bits, groups of 64) against the same PEFT LoRA over a float base: PEFT's own QLoRA needs
bitsandbytes' CUDA kernels, which a CPU machine does not have.

`--device cuda` runs both engines on the GPU; the peaks are then of allocated GPU memory.

    python bench/finetune.py [--threads 2] [--dtypes fp32,bf16] [--steps 8] [--rounds 2] [--paired-steps 16]
                             [--no-compile] [--quantize-base int4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_5000.json"
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "llama2_tokenizer.model"
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=2816, vocab_size=32000, max_position_embeddings=512)
SEQ, BATCH, WARMUP = 256, 4, 3  # the first steps compile


def make_base(folder: Path):
    import shutil

    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE))
    model.save_pretrained(folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.model")


def batches(steps: int, device: str):
    """The same token batches for both engines: Alpaca samples masked with camelid's template code."""
    import torch

    from camelid.data.instruct import load_conversations
    from camelid.data.masking import IGNORE, mask_conversation
    from camelid.data.packing import collate, unpacked_rows
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(TOKENIZER)
    samples = []
    for _, conversation in load_conversations(DATA)[:BATCH * (steps + WARMUP)]:
        samples += mask_conversation(tok, "alpaca", conversation, SEQ)[:1]
    out = []
    for i in range(0, BATCH * (steps + WARMUP), BATCH):
        batch = collate(unpacked_rows(samples[i:i + BATCH]))
        pad = SEQ - batch["inputs"].shape[1]  # a fixed shape: both engines do the same work every step
        out.append({"inputs": torch.nn.functional.pad(batch["inputs"], (0, pad)).to(device),
                    "targets": torch.nn.functional.pad(batch["targets"], (0, pad), value=IGNORE).to(device)})
    return out


def make_step(engine: str, base: Path, dtype: str, compile: bool, quantize_base: str | None, device: str):
    """One engine's training step on a batch: forward, loss, backward, clipping, AdamW. Returns (step, params)."""
    import torch
    import torch.nn.functional as F

    amp = dtype == "bf16"
    device_type = torch.device(device).type
    if engine == "camelid":
        from camelid.formats.load import load_model
        from camelid.model.lora import LoRAConfig, add_lora
        from camelid.model.quant import QuantSpec
        from camelid.train.finetune import sft_loss

        # as finetune does: the frozen base in the compute dtype, or quantized tensor by tensor as it loads
        qlora = QuantSpec(quantize_base, 64, "float") if quantize_base else None
        model = load_model(base, device, dtype, quantize=qlora).model.train()
        add_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"]))
        forward = torch.compile(model, dynamic=True) if compile else model  # as `compile: true` does

        def loss_of(batch):  # camelid's fine-tuning loss: logits only where a token is trained
            return sft_loss(forward, batch, torch.bfloat16 if amp else None) / (batch["targets"] != -100).sum()
    else:
        import transformers as tf
        from peft import LoraConfig, get_peft_model

        hf = tf.LlamaForCausalLM.from_pretrained(base, attn_implementation="sdpa").to(device)
        model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).train()

        def loss_of(batch):  # the textbook loss over the whole sequence, as Trainer + PEFT compute it
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                logits = model(input_ids=batch["inputs"]).logits
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), batch["targets"].view(-1),
                                   ignore_index=-100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0, fused=device_type == "cuda")

    def step(batch) -> float:
        t0 = time.perf_counter()
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return step, params


def run_engine(engine: str, base: Path, dtype: str, steps: int, threads: int, compile: bool,
               quantize_base: str | None, device: str) -> dict:
    """One engine alone in this process: its tokens/s and its peak memory."""
    import torch

    torch.set_num_threads(threads)
    data = batches(steps, device)
    step, params = make_step(engine, base, dtype, compile, quantize_base, device)
    times = [step(batch) for batch in data]
    return {"tok_s": statistics.median(BATCH * SEQ / t for t in times[WARMUP:]),
            "peak_rss_mb": (torch.cuda.max_memory_allocated() / 2 ** 20 if torch.device(device).type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "trainable": sum(p.numel() for p in params)}


def run_paired(base: Path, dtype: str, steps: int, threads: int, compile: bool, quantize_base: str | None,
               device: str) -> dict:
    """Both engines in one process, taking turns step by step on the same batches: each pair of steps sees the
    same state of a shared machine, so the median of the pairs' ratios is the least noisy speed ratio."""
    import torch

    torch.set_num_threads(threads)
    data = batches(steps, device)
    camelid, _ = make_step("camelid", base, dtype, compile, quantize_base, device)
    peft, _ = make_step("peft", base, dtype, compile, quantize_base, device)
    pairs = [(camelid(batch), peft(batch)) for batch in data]
    return {"ratios": [p / c for c, p in pairs[WARMUP:]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="processes per engine, the engines taking turns")
    ap.add_argument("--paired-steps", type=int, default=16, help="steps of the one process running both engines")
    ap.add_argument("--no-compile", action="store_true", help="camelid without torch.compile")
    ap.add_argument("--quantize-base", choices=["int4", "int8"], help="camelid as QLoRA over this base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:  # a child process: one engine (or both, paired), one dtype
        run = run_paired if args.engine == "paired" else partial(run_engine, args.engine)
        print(json.dumps(run(Path(args.base), args.dtypes, args.steps, args.threads, not args.no_compile,
                             args.quantize_base, args.device)))
        return
    import peft
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_base(base)
        for dtype in args.dtypes.split(","):
            def child(engine: str, steps: int) -> dict:  # called within this iteration (B023 below)
                out = subprocess.run([sys.executable, __file__, "--engine", engine, "--base", str(base),
                                      "--dtypes", dtype, "--steps", str(steps), "--threads", str(args.threads),  # noqa: B023
                                      "--device", args.device] + ["--no-compile"] * args.no_compile
                                     + (["--quantize-base", args.quantize_base] if args.quantize_base else []),
                                     capture_output=True, text=True, check=True)
                return json.loads(out.stdout.strip().splitlines()[-1])

            res = {"camelid": [], "peft": []}
            for _ in range(args.rounds):
                for engine in res:
                    res[engine].append(child(engine, args.steps))
            ratios = child("paired", args.paired_steps)["ratios"] if args.paired_steps else [float("nan")]
            # each engine's fastest round (the host's noise only ever slows a run) and its largest peak
            c, p = ({"tok_s": max(r["tok_s"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                     "trainable": runs[0]["trainable"]} for runs in (res["camelid"], res["peft"]))
            print(json.dumps({"bench": "finetune-lora", "dtype": dtype, "device": args.device,
                              "threads": args.threads, "seq_len": SEQ,
                              "camelid_compile": not args.no_compile, "camelid_base": args.quantize_base or dtype,
                              "batch": BATCH, "rounds": args.rounds, "camelid_tok_s": round(c["tok_s"], 1),
                              "peft_tok_s": round(p["tok_s"], 1),
                              "speed_ratio": round(c["tok_s"] / p["tok_s"], 3),
                              "paired_speed_ratio": round(statistics.median(ratios), 3),
                              "paired_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]
                              if len(ratios) > 1 else None,
                              "camelid_peak_mb": round(c["peak_rss_mb"]), "peft_peak_mb": round(p["peak_rss_mb"]),
                              "memory_ratio": round(c["peak_rss_mb"] / p["peak_rss_mb"], 3),
                              "trainable": [c["trainable"], p["trainable"]], "torch": torch.__version__,
                              "transformers": transformers.__version__, "peft": peft.__version__}), flush=True)


if __name__ == "__main__":
    main()
