"""DPO with LoRA, speed and memory: camelid against TRL + PEFT + transformers, same run.

The 160M LLaMA shape of bench/finetune.py (random weights), LoRA rank 8 / alpha 16 on q and v, AdamW 3e-4,
beta 0.1, batches of 4 pairs from ../shared/data/preference/dpo_en_demo.json rendered with the Alpaca template
by camelid's masking code and cut to at most 128 prompt and 128 reply tokens, the same token ids for both.
Both take the reference from the base with the adapter off on every step (TRL's default for a PEFT model,
camelid's for LoRA without precompute_ref). camelid reads each pair's prompt once and computes logits only
where they predict a reply token; TRL runs chosen and rejected as two padded rows through its fused LM head.

Each engine runs alone in its own process for its peak resident memory (ru_maxrss), --rounds times taking
turns; the fastest round counts. Then one process runs both, step by step on the same batches, and the median
of the pairs' ratios is the speed ratio least moved by a shared machine's noise. In bf16 each engine does what
its trainer does by default: camelid keeps the frozen base in bf16 under autocast, TRL loads it in fp32 and
trains with bf16=True. Prints one JSON line per dtype.

    python bench/preference.py [--threads 2] [--dtypes fp32,bf16] [--steps 6] [--rounds 2] [--paired-steps 8]
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
import warnings
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune import SHAPE, TOKENIZER, make_base  # noqa: E402  the same base as the SFT benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preference" / "dpo_en_demo.json"
BATCH, WARMUP, CUT = 4, 2, 128


def pairs(steps: int) -> list[list[tuple[list[int], list[int], list[int]]]]:
    """Batches of (prompt, chosen, rejected) ids, the same for both engines."""
    from camelid.data.preference import PreferenceStats, read_preferences, reply_tokens
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(TOKENIZER)
    out = []
    for p in read_preferences(DATA, False, PreferenceStats()):
        prompt, chosen = reply_tokens(tok, "alpaca", p.prompt, p.chosen)
        _, rejected = reply_tokens(tok, "alpaca", p.prompt, p.rejected)
        out.append((prompt[-CUT:], chosen[:CUT], rejected[:CUT]))
    need = BATCH * (steps + WARMUP)
    out = (out * (need // len(out) + 1))[:need]
    return [out[i:i + BATCH] for i in range(0, need, BATCH)]


def tokens(batch) -> int:
    return sum(len(p) + len(c) + len(r) for p, c, r in batch)


def make_step(engine: str, base: Path, dtype: str, compile: bool):
    import torch

    if engine == "camelid":
        from camelid.formats.load import load_model
        from camelid.model.lora import LoRAConfig, add_lora
        from camelid.train.config import FinetuneConfig
        from camelid.train.preference import Item, item_loss

        model = load_model(base, "cpu", dtype).model.train()
        add_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"]))
        forward = torch.compile(model, dynamic=True) if compile else model
        cfg = FinetuneConfig(method="dpo", lora=True, beta=0.1)
        amp = torch.bfloat16 if dtype == "bf16" else None

        def loss_of(batch):
            items = [Item(p, [c, r]) for p, c, r in batch]
            return item_loss(cfg, forward, items, None, "cpu", amp)[0] / len(items)
    else:
        import transformers as tf
        from datasets import Dataset
        from peft import LoraConfig, get_peft_model
        from tokenizers import Tokenizer, models
        from trl import DPOConfig, DPOTrainer

        hf = tf.LlamaForCausalLM.from_pretrained(base, attn_implementation="sdpa")
        model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM")).train()
        vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SHAPE["vocab_size"])}, unk_token="t0"))
        processing = tf.PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="t0", eos_token="t2")
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=out, report_to=[], beta=0.1, use_cpu=True,
                                                             bf16=dtype == "bf16", per_device_train_batch_size=BATCH),
                                 train_dataset=Dataset.from_list([{"prompt": "t3", "chosen": " t4",
                                                                   "rejected": " t5"}] * BATCH),
                                 processing_class=processing)

        def loss_of(batch):
            rows = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in batch]
            return trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)

    def step(batch) -> float:
        t0 = time.perf_counter()
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    return step


def run_engine(engine: str, base: Path, dtype: str, steps: int, threads: int, compile: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    data = pairs(steps)
    step = make_step(engine, base, dtype, compile)
    times = [step(b) for b in data]
    return {"tok_s": statistics.median(tokens(b) / t for b, t in zip(data[WARMUP:], times[WARMUP:])),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_paired(base: Path, dtype: str, steps: int, threads: int, compile: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    data = pairs(steps)
    camelid, trl = make_step("camelid", base, dtype, compile), make_step("trl", base, dtype, compile)
    times = [(camelid(b), trl(b)) for b in data]
    return {"ratios": [t / c for c, t in times[WARMUP:]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--paired-steps", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="camelid without torch.compile")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        run = run_paired if args.engine == "paired" else partial(run_engine, args.engine)
        print(json.dumps(run(Path(args.base), args.dtypes, args.steps, args.threads, not args.no_compile)))
        return
    import peft
    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_base(base)
        for dtype in args.dtypes.split(","):
            def child(engine: str, steps: int, dtype=dtype) -> dict:
                out = subprocess.run([sys.executable, __file__, "--engine", engine, "--base", str(base), "--dtypes",
                                      dtype, "--steps", str(steps), "--threads", str(args.threads)]
                                     + ["--no-compile"] * args.no_compile, capture_output=True, text=True, check=True)
                return json.loads(out.stdout.strip().splitlines()[-1])

            res = {"camelid": [], "trl": []}
            for _ in range(args.rounds):
                for engine in res:
                    res[engine].append(child(engine, args.steps))
            ratios = child("paired", args.paired_steps)["ratios"] if args.paired_steps else [float("nan")]
            c, t = ({"tok_s": max(r["tok_s"] for r in runs), "peak": max(r["peak_rss_mb"] for r in runs)}
                    for runs in (res["camelid"], res["trl"]))
            print(json.dumps({"bench": "preference-dpo-lora", "dtype": dtype, "threads": args.threads,
                              "batch_pairs": BATCH, "camelid_compile": not args.no_compile,
                              "rounds": args.rounds, "camelid_tok_s": round(c["tok_s"], 1),
                              "trl_tok_s": round(t["tok_s"], 1), "speed_ratio": round(c["tok_s"] / t["tok_s"], 3),
                              "paired_speed_ratio": round(statistics.median(ratios), 3),
                              "camelid_peak_mb": round(c["peak"]), "trl_peak_mb": round(t["peak"]),
                              "memory_ratio": round(c["peak"] / t["peak"], 3), "torch": torch.__version__,
                              "transformers": transformers.__version__, "peft": peft.__version__,
                              "trl": trl.__version__}), flush=True)


if __name__ == "__main__":
    main()
