"""Encoder-decoder generation speed: camelid's T5 against transformers' generate, same weights, same run, same
threads.

Builds a Flan-T5-base-shaped model with random weights (d_model 768, 12 + 12 blocks, 12 heads, gated-GELU FFN
2048, vocab 32128), then measures the time to the first token (the encoder over a 256-token prompt and one
decoder step) and decode tokens/s for 64 greedy tokens, checking both produce the same tokens. Prints one
JSON line with both figures and the ratios.

    python bench/t5.py [--threads 2] [--new-tokens 64] [--prompt-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from camelid.formats.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from camelid.formats.load import build_model  # noqa: E402
from camelid.generate.decoding import prepare_for_decoding  # noqa: E402
from camelid.generate.sampling import SamplingParams  # noqa: E402
from camelid.generate.seq2seq import seq2seq_tokens  # noqa: E402


def random_flan_t5(d_model: int, d_ff: int, layers: int, heads: int):
    """A Flan-T5-shaped transformers model (gated GELU, its own output layer, vocab 32128) with random weights,
    and camelid's copy of it."""
    import transformers as tf

    cfg = tf.T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers, num_heads=heads,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ours = config_from_hf({**model.config.to_dict(), "model_type": "t5", "tie_word_embeddings": False})
    sd = state_dict_from_hf({k: v.detach() for k, v in model.state_dict().items()} |
                            {"lm_head.weight": model.lm_head.weight.detach()}, ours, "flan-t5")
    return model, build_model(ours, sd, "flan-t5")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, ours = random_flan_t5(d_model=768, d_ff=2048, layers=12, heads=12)  # flan-t5-base's shape
    ours = prepare_for_decoding(ours)
    ids = torch.randint(2, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    ids[0, -1] = 1

    def theirs(n):
        with torch.inference_mode():
            return ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, 1:].tolist()

    def camelid(n):
        return [step[0] for step in seq2seq_tokens(ours, [ids[0].tolist()], n, SamplingParams.greedy())]

    assert camelid(16) == theirs(16), "greedy tokens differ"
    result = {"bench": "t5", "model": "flan-t5-base shape (random weights)", "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    for name, run in (("camelid", camelid), ("transformers", theirs)):
        run(2)  # warm-up
        first = min(timed(lambda run=run: run(1)) for _ in range(3))
        whole = min(timed(lambda run=run: run(args.new_tokens)) for _ in range(2))
        result[f"{name}_first_token_s"] = round(first, 4)
        result[f"{name}_decode_tok_s"] = round((args.new_tokens - 1) / (whole - first), 2)
    result["first_token_ratio"] = round(result["transformers_first_token_s"] / result["camelid_first_token_s"], 3)
    result["decode_ratio"] = round(result["camelid_decode_tok_s"] / result["transformers_decode_tok_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
