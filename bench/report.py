"""Fills the tables of docs/benchmarks.md from the JSON lines the bench scripts printed.

Each bench's latest run is kept in bench/results/NAME.jsonl (its stdout's JSON lines, as printed); a table
`<!-- table:NAME -->` shows that file, laid out by the lines' "bench" field:

    python bench/generate.py > bench/results/generate.jsonl
    python bench/report.py            # rewrites the tables between the <!-- table:NAME --> markers
    python bench/report.py --check    # exit 1 if docs/benchmarks.md is not what the results give

The prose around the tables is written by hand; every figure in a table comes from a results file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


def _x(v) -> str:
    return f"**{v:.2f}x**" if v is not None else ""


def _n(v, digits=1) -> str:
    return f"{v:,.{digits}f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def generate(rows):
    yield "| dtype | camelid decode | transformers decode | ratio | camelid prefill | transformers prefill | ratio |"
    yield "|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['dtype']} | {_n(r['camelid_decode_tok_s'])} tok/s | {_n(r['transformers_decode_tok_s'])} | "
               f"{_x(r['decode_ratio'])} | {_n(r['camelid_prefill_tok_s'])} tok/s | "
               f"{_n(r['transformers_prefill_tok_s'])} | {_x(r['prefill_ratio'])} |")


def gguf_speed(rows):
    yield "| file | camelid prompt | llama.cpp prompt | ratio | camelid decode | llama.cpp decode | ratio |"
    yield "|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['file']} ({_mb(r['bytes'])}) | {_n(r['camelid_prompt_tok_s'])} tok/s | "
               f"{_n(r['llama_cpp_prompt_tok_s'])} | {_x(r['prompt_ratio'])} | {_n(r['camelid_decode_tok_s'])} tok/s | "
               f"{_n(r['llama_cpp_decode_tok_s'])} | {_x(r['decode_ratio'])} |")


def gguf_memory(rows):
    yield ("| file | camelid: open + first token | peak over baseline / file size | llama.cpp: open + first token "
           "| peak over baseline / file size |")
    yield "|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['file']} ({_mb(r['bytes'])}) | {r['camelid_first_token_s']:.2f} s | "
               f"{r['camelid_peak_over_baseline_over_file']:.2f}x | {r['llama_cpp_first_token_s']:.2f} s | "
               f"{r['llama_cpp_peak_over_baseline_over_file']:.2f}x |")


def gguf_quality(rows):
    yield "| file (by llama-quantize) | size | camelid perplexity | llama.cpp perplexity |"
    yield "|---|---|---|---|"
    for r in rows:
        yield (f"| {r['file']} | {r['bytes'] / 1e6:.1f} MB | {r['camelid_perplexity']:.3f} | "
               f"{r['llama_cpp_perplexity']:.3f} |")


def train(rows):
    gpu = any("camelid_peak_mb" in r for r in rows)
    yield ("| size | dtype | device | camelid (compile) | transformers | ratio | camelid MFU |"
           + (" camelid peak | transformers peak | memory |" if gpu else ""))
    yield "|---|---|---|---|---|---|---|" + ("---|---|---|" if gpu else "")
    for r in rows:
        line = (f"| {r['params']} | {r['dtype']} | {r.get('device', 'cpu')} | {_n(r['camelid_tok_s'], 0)} tok/s | "
                f"{_n(r['transformers_tok_s'], 0)} | {_x(r['ratio'])} | {r['camelid_mfu']:.2f} |")
        if gpu:
            line += (f" {r['camelid_peak_mb']:,} MB | {r['transformers_peak_mb']:,} MB | "
                     f"{_x(r['memory_ratio'])} |")
        yield line


def finetune(rows):
    yield "| dtype | camelid base | camelid | PEFT | speed | paired speed | camelid peak | PEFT peak | memory |"
    yield "|---|---|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['dtype']} | {r['camelid_base']} | {_n(r['camelid_tok_s'])} tok/s | {_n(r['peft_tok_s'])} | "
               f"{_x(r['speed_ratio'])} | {_x(r['paired_speed_ratio'])} | {r['camelid_peak_mb']:,} MB | "
               f"{r['peft_peak_mb']:,} MB | {_x(r['memory_ratio'])} |")


def preference(rows):
    yield "| dtype | camelid | TRL + PEFT | speed | paired speed | camelid peak | TRL peak | memory |"
    yield "|---|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['dtype']} | {_n(r['camelid_tok_s'])} tok/s | {_n(r['trl_tok_s'])} | {_x(r['speed_ratio'])} | "
               f"{_x(r['paired_speed_ratio'])} | {r['camelid_peak_mb']:,} MB | {r['trl_peak_mb']:,} MB | "
               f"{_x(r['memory_ratio'])} |")


def eval_speed(rows):
    yield "| task | camelid | lm-eval (HF backend) | ratio | same accuracy |"
    yield "|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['task']} {r['shots']}-shot, {r['items']} questions | {r['camelid_items_per_s']:.2f} items/s | "
               f"{r['lm_eval_items_per_s']:.2f} items/s (batch {r['lm_eval_batch_size']}) | {_x(r['ratio'])} | "
               f"{'yes' if r['acc_equal'] else 'no'} |")


def serve_load(rows):
    yield ("| scenario | clients | camelid tok/s | llama-server tok/s | ratio | first token p95 (camelid / "
           "llama-server) | token gap p95 | peak RSS | errors |")
    yield "|---|---|---|---|---|---|---|---|---|"
    for r in rows:
        if r.get("summary"):
            continue
        yield (f"| {r['scenario']} | {r['clients']} | {_n(r['camelid_tokens_per_s'])} | "
               f"{_n(r['llama_server_tokens_per_s'])} | {_x(r['tokens_per_s_ratio'])} | "
               f"{r['camelid_ttft_p95_s']:.2f} s / {r['llama_server_ttft_p95_s']:.2f} s | "
               f"{r['camelid_gap_p95_s'] * 1000:.0f} ms / {r['llama_server_gap_p95_s'] * 1000:.0f} ms | "
               f"{r['camelid_peak_rss_mb']:,} / {r['llama_server_peak_rss_mb']:,} MB | "
               f"{r['camelid_errors']} / {r['llama_server_errors']} |")
    for r in rows:
        if r.get("scenario") == "shared_prefix":
            yield (f"| shared prefix, cache off | {r['clients']} | {_n(r['camelid_no_cache_tokens_per_s'])} | "
                   f"{_n(r['llama_server_no_cache_tokens_per_s'])} | | "
                   f"{r['camelid_no_cache_ttft_p95_s']:.2f} s / {r['llama_server_no_cache_ttft_p95_s']:.2f} s | "
                   f"| | {r['camelid_no_cache_errors']} / {r['llama_server_no_cache_errors']} |")


def serve_kv(rows):
    yield "| case | camelid's way | the other way | ratio |"
    yield "|---|---|---|---|"
    for r in rows:
        if r["case"] == "chunked_prefill":
            yield (f"| p95 token gap of 4 streams while a {r['prompt_tokens']:,}-token prompt arrives "
                   f"(chunks of {r['chunk']} / one piece) | {r['p95_gap_chunked_s'] * 1000:.0f} ms | "
                   f"{r['p95_gap_whole_s'] * 1000:.0f} ms | {_x(r['ratio'])} |")
            yield (f"| its time to first token (chunks / one piece) | {r['ttft_chunked_s']:.2f} s | "
                   f"{r['ttft_whole_s']:.2f} s | |")
        elif r["case"] == "prefix_reuse":
            yield (f"| first token after a shared {r['system_tokens']:,}-token prompt (prefix cache / none) | "
                   f"{r['ttft_reuse_s']:.2f} s | {r['ttft_no_reuse_s']:.2f} s | {_x(r['ratio'])} |")
        elif r["case"] == "kv_memory":
            yield (f"| KV memory held at peak / preallocated for every slot | {r['peak_held_mb']:,} MB | "
                   f"{r['preallocated_mb']:,} MB | {_x(r['ratio'])} |")
        elif r["case"] == "kv_types":
            yield (f"| perplexity with {r['kv_type']} KV / f32 ({r['scored_tokens']:,} tokens), memory "
                   f"{_x(r['memory_ratio'])} | {r['ppl']:.4f} | {r['ppl_f32']:.4f} | "
                   f"{r['ppl_change_pct']:+.3f}% |")


def serve_soak(rows):
    yield "| minutes | clients | requests | by status | 5xx | RSS early / end | pool at the end | tracebacks logged |"
    yield "|---|---|---|---|---|---|---|---|"
    for r in rows:
        status = ", ".join(f"{k}: {v}" for k, v in r["by_status"].items())
        yield (f"| {r['minutes']:g} | {r['clients']} | {r['requests']:,} | {status} | {r['5xx']} | "
               f"{r['rss_early_mb']} / {r['rss_end_mb']} MB ({_x(r['rss_ratio'])}) | "
               f"{r['kv_blocks_used_end']:.0f} used, {r['kv_blocks_reserved_end']:.0f} reserved | "
               f"{r['server_log_tracebacks']} |")


def constrained(rows):
    yield "| library | mask per token | compile | correct | time / llguidance's |"
    yield "|---|---|---|---|---|"
    for r in rows:
        base = r["llguidance"]["mask_us_per_token"]
        for name in ("llguidance", "xgrammar", "outlines_core"):
            m = r[name]
            if "mask_us_per_token" not in m:
                yield f"| {name} | {m.get('error', 'not run')} | | | |"
                continue
            yield (f"| {name} | {m['mask_us_per_token']:.1f} µs | {m['compile_ms']:.0f} ms | "
                   f"{'yes' if m['correct'] else 'no'} | {_x(m['mask_us_per_token'] / base)} |")
        c = r["camelid"]
        yield (f"| camelid generate, end to end | {c['constrained_ms_per_token']:.3f} ms/token with the schema, "
               f"{c['plain_ms_per_token']:.3f} without | | | {c['overhead_ms_per_token']:+.3f} ms/token |")


def speculative(rows):
    yield "| case | plain | speculative | ratio | drafts accepted | tokens per pass |"
    yield "|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['case']} | {_n(r['plain_tok_s'])} tok/s | {_n(r['speculative_tok_s'])} tok/s | "
               f"{_x(r['ratio'])} | {r['acceptance']:.0%} | {r['tokens_per_pass']:.2f} |")


def t5(rows):
    yield ("| model | camelid first token | transformers first token | ratio | camelid decode | transformers decode "
           "| ratio |")
    yield "|---|---|---|---|---|---|---|"
    for r in rows:
        yield (f"| {r['model']}, {r['prompt_tokens']}-token prompt | {r['camelid_first_token_s']:.3f} s | "
               f"{r['transformers_first_token_s']:.3f} s | {_x(r['first_token_ratio'])} | "
               f"{_n(r['camelid_decode_tok_s'])} tok/s | {_n(r['transformers_decode_tok_s'])} | "
               f"{_x(r['decode_ratio'])} |")


def t5_serve(rows):
    yield "| model | requests (prompt tokens) | camelid serving | transformers batched generate | ratio |"
    yield "|---|---|---|---|---|"
    for r in rows:
        prompts = f"{min(r['prompt_tokens'])}-{max(r['prompt_tokens'])}"
        yield (f"| {r['model']} | {r['requests']} x {r['new_tokens']} tokens ({prompts}) | "
               f"{_n(r['camelid_tokens_per_s'])} tok/s | {_n(r['transformers_tokens_per_s'])} tok/s | "
               f"{_x(r['ratio'])} |")


# by the "bench" field of the JSON lines
TABLES = {"generate": generate, "gguf_speed": gguf_speed, "gguf_memory": gguf_memory,
          "gguf_quality": gguf_quality, "train": train,
          "finetune-lora": finetune, "preference-dpo-lora": preference, "eval_speed": eval_speed,
          "serve_load": serve_load, "constrained-json-schema": constrained, "speculative": speculative,
          "serve_kv": serve_kv, "serve_soak": serve_soak, "t5": t5, "t5_serve": t5_serve}


def read_results(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        raise SystemExit(f"{PAGE}: a table reads {path}, which does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{n}: not a JSON line ({exc})") from None
    return rows


def render(page: str) -> str:
    def table(match: re.Match) -> str:
        name = match.group(1)
        rows = read_results(name)
        kind = rows[0].get("bench") if rows else None
        if kind not in TABLES:
            raise SystemExit(f"bench/results/{name}.jsonl: no JSON lines of a bench this page has tables for")
        body = "\n".join(TABLES[kind](rows))
        notes = sorted({r["note"] for r in rows if r.get("note")})
        if notes:  # figures not printed by this checkout's run of the bench say where they come from
            body += "\n\n" + "\n".join(f"*{note[0].upper()}{note[1:]}.*" for note in notes)
        return f"<!-- table:{name} -->\n{body}\n<!-- /table -->"

    return re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", table, page, flags=re.S)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 if the page's tables are out of date")
    args = ap.parse_args()
    page = PAGE.read_text(encoding="utf-8")
    new = render(page)
    if args.check:
        if new != page:
            sys.exit(f"{PAGE} is out of date with bench/results: run python bench/report.py")
        return
    PAGE.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
