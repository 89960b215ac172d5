"""The `camelid` command: parses arguments and calls library functions; nothing else lives here."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from camelid.errors import CamelidError, Preempted, os_error_message


def _sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (llama.cpp semantics; --temperature 0 is greedy)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


TOKENIZER_HELP = ("a llama2.c checkpoint's tokenizer.bin; or, for a Hugging Face folder, a tokenizer (tokenizer.json, "
                  "a SentencePiece .model or a folder) in place of its own")


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("model", help="camelid folder, Hugging Face folder, or llama2.c .bin")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on cpu, bf16 on gpu)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--adapter", action="append", default=[],
                   help="a LoRA adapter folder (PEFT layout), merged into MODEL; `serve` also takes NAME=DIR "
                        "(repeatable): an adapter kept apart, which a request picks by its `model` name")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not compile the CPU decode kernel (first use compiles for a few seconds)")


def _force_arg(p: argparse.ArgumentParser, help_text: str = "replace an earlier camelid output there"):
    p.add_argument("--force", action="store_true", help=help_text + " (a folder camelid did not write never is)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camelid", description="Local large language models, start to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Prompt words may follow options (`generate M -n 20 "Once upon"`); argparse leaves them over.
    if rest and args.command == "generate" and not any(r.startswith("-") and r != "-" for r in rest):
        args.prompt += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.handler(args) or 0
    except CamelidError as exc:
        return _error(str(exc))
    except Preempted as exc:
        print(f"camelid: {exc}", file=sys.stderr)
        return Preempted.EXIT_CODE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a full disk, a read-only or missing folder, /proc...: the path and the reason
        return _error(os_error_message(exc))
    except MemoryError:
        return _error("out of memory")


def _error(message: str) -> int:
    print(f"camelid: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _load(args, decoding: bool = True, seq2seq: bool = False):
    """The command's model; `seq2seq`: the command also runs encoder-decoders (T5)."""
    import torch

    from camelid.formats.load import load_model
    from camelid.formats.loaded import require_decoder_only, require_policy
    from camelid.generate.decoding import prepare_for_decoding
    from camelid.tokenizer.chat_template import resolve_template

    _check_threads(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    merged = [a for a in args.adapter if "=" not in a]
    if len(merged) > 1 or len(merged) < len(args.adapter):
        raise CamelidError("--adapter: one adapter folder is merged into the model (camelid serve also serves "
                           "NAME=DIR adapters per request)")
    lm = require_policy(load_model(args.model, args.device, args.dtype, args.tokenizer), args.model)
    if not seq2seq:
        require_decoder_only(lm, args.model, f"`camelid {args.command}`")
    if lm.load_note:
        print(f"camelid: {lm.load_note}", file=sys.stderr)
    if getattr(args, "template", None):
        lm.template = _template(args.template)
        resolve_template(lm.template)  # an unknown name fails here, not at the first request
    elif lm.template_note:
        print(f"camelid: {lm.template_note}", file=sys.stderr)
    if merged:
        from camelid.formats.peft import load_adapter
        from camelid.model.lora import merge_lora

        merge_lora(load_adapter(lm.model, merged[0]))  # merged: decoding then costs what the base costs
    if decoding:
        prepare_for_decoding(lm.model, compile=not args.no_compile)
    return lm


def _check_threads(args):
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise CamelidError(f"--threads {args.threads}: must be at least 1")


def _speculation_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("speculative decoding (the same text, greedy or sampled, in fewer passes)")
    drafter = g.add_mutually_exclusive_group()
    drafter.add_argument("--lookup", nargs="?", type=int, const=3, default=None, metavar="N",
                         help="draft the tokens that followed the last occurrence of the text's last N tokens "
                              "(prompt lookup; N defaults to 3): pays when the reply repeats its input")
    drafter.add_argument("--draft", default=None, metavar="MODEL", help="a smaller model with the same tokenizer "
                                                                        "drafts the tokens")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per pass (default 4)")


def _speculation(args, lm, params):
    from camelid.generate.speculative import DraftModel, PromptLookup, Speculation

    if args.draft_tokens < 1:
        raise CamelidError("--draft-tokens must be at least 1")
    if args.lookup is not None:
        if args.lookup < 1:
            raise CamelidError("--lookup N: N must be at least 1")
        return Speculation(PromptLookup(args.lookup), args.draft_tokens)
    if args.draft:
        from camelid.formats.load import load_model
        from camelid.formats.loaded import require_policy

        draft = require_policy(load_model(args.draft, args.device, args.dtype), args.draft)
        return Speculation(DraftModel(draft.model, lm.config.vocab_size, params, params.seed), args.draft_tokens)
    return None


def _load_draft(args):
    from camelid.formats.load import load_model
    from camelid.formats.loaded import require_policy
    from camelid.generate.decoding import prepare_for_decoding

    draft = require_policy(load_model(args.draft, args.device, args.dtype), args.draft)
    return prepare_for_decoding(draft.model, compile=not args.no_compile)


def _serve_lookup(args):
    from camelid.generate.speculative import PromptLookup

    if args.draft_tokens < 1:
        raise CamelidError("--draft-tokens must be at least 1")
    if args.lookup is not None and args.lookup < 1:
        raise CamelidError("--lookup N: N must be at least 1")
    return None if args.lookup is None else PromptLookup(args.lookup)


def _params(args):
    from camelid.generate.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def _args_info(p: argparse.ArgumentParser):
    p.add_argument("model", help="a model path or a preset name (see `camelid info --list`)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--context", type=int, default=None, help="context length for the KV cache figure")


def cmd_info(args):
    from camelid.info import describe, list_presets

    _check_context(args.context)
    print(list_presets() if args.list or not args.model else describe(args.model, args.context))


def _args_estimate(p: argparse.ArgumentParser):
    p.add_argument("model", nargs="?", help="a model path (or use --preset)")
    p.add_argument("--preset", help="a preset name, e.g. llama-13b")
    p.add_argument("--quant", default="int4", choices=["fp32", "bf16", "fp16", "int8", "int4"])
    p.add_argument("--context", type=int, default=None)


def cmd_estimate(args):
    from camelid.info import fits

    if not (args.model or args.preset):
        raise CamelidError("estimate: give a model path or --preset NAME")
    _check_context(args.context)
    report, ok = fits(args.preset or args.model, args.quant, args.context)
    print(report)
    return 0 if ok else 2


def _check_context(context: int | None):
    if context is not None and context < 1:
        raise CamelidError(f"--context {context}: must be at least 1 token")


def _template(value: str | None) -> str | None:
    """A built-in template name, or a Jinja file read into its source."""
    if value and Path(value).is_file():
        from camelid.files import read_text

        return read_text(value)
    return value


def _args_convert(p: argparse.ArgumentParser):
    p.add_argument("source", help="camelid folder, Hugging Face folder, GGUF, llama.cpp's 2023 .bin, or llama2.c .bin")
    p.add_argument("dest", help="output folder (a .gguf file with --to gguf)")
    p.add_argument("--to", default="camelid", choices=["camelid", "hf", "gguf"],
                   help="gguf: a GGML/GGMF/GGJT .bin rewritten as GGUF, its blocks as they are (as llama.cpp's "
                        "convert_llama_ggml_to_gguf.py does); `camelid export` writes GGUF from any model")
    p.add_argument("--template", default=None, help="chat template to store: alpaca, vicuna, llama2, chatml, "
                                                    "llama3, gemma, raw, or a Jinja file")
    p.add_argument("--stop", action="append", default=None, help="stop string to store (repeatable)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 for the written weights")
    _force_arg(p)


def cmd_convert(args):
    from camelid.files import check_output_folder
    from camelid.formats.load import export_hf, load_model, save_native

    if args.to == "gguf":
        return _convert_legacy_ggml(args)
    check_output_folder(args.dest, args.force)  # before the model loads, not after
    template = _template(args.template)
    lm = load_model(args.source, "cpu", args.dtype, args.tokenizer)
    if args.to == "hf":
        if template:
            lm.template = template
        export_hf(lm, args.dest, args.force)
    else:
        save_native(lm, args.dest, template, args.stop, args.force)
    print(f"wrote {args.dest}")


def _convert_legacy_ggml(args):
    from camelid.formats import ggml_legacy

    if not ggml_legacy.is_legacy_ggml(Path(args.source)):
        raise CamelidError(f"{args.source}: --to gguf rewrites llama.cpp's GGML/GGMF/GGJT .bin files; "
                           f"`camelid export --gguf` writes any other model as GGUF")
    if Path(args.dest).exists() and not args.force:
        raise CamelidError(f"{args.dest} exists (--force to replace it)")
    gf, note = ggml_legacy.read_legacy_ggml(args.source)
    if note:
        print(f"camelid: {note}", file=sys.stderr)
    ggml_legacy.write_gguf(gf, Path(args.dest))
    print(f"wrote {args.dest}")


def _args_apply_delta(p: argparse.ArgumentParser):
    p.add_argument("base", help="the base model: a Hugging Face folder, or Meta's params.json + consolidated.*.pth")
    p.add_argument("delta", help="the delta weights: a Hugging Face folder (e.g. lmsys/vicuna-7b-delta-v1.1), or "
                                 "an EasyLM streaming checkpoint (Koala's published diff)")
    p.add_argument("out", help="output folder: the fine-tuned model as a Hugging Face folder")
    _force_arg(p)


def cmd_apply_delta(args):
    from camelid.formats.delta import apply_delta

    n = apply_delta(args.base, args.delta, args.out, args.force)
    print(f"wrote {args.out} ({n} tensors)")


def _args_export(p: argparse.ArgumentParser):
    p.add_argument("source", help="any model camelid opens")
    p.add_argument("dest", help="output folder: NAME-QUANT.gguf, README.md and an Ollama Modelfile go there")
    p.add_argument("--gguf", action="store_true", required=True, help="write GGUF (the one export format)")
    p.add_argument("--quant", default="f16", help="f32, f16, q8_0, q4_0 or q4_k_m")
    p.add_argument("--name", default=None, help="file and model name (default: the source's name)")
    p.add_argument("--template", default=None, help="chat template to store (default: the model's own)")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    _force_arg(p, "replace a GGUF file of the same name and quantization")


def cmd_export(args):
    from camelid.formats.gguf_export import export_gguf
    from camelid.formats.load import load_model

    lm = load_model(args.source, "cpu", "fp32", args.tokenizer)
    if args.template:
        lm.template = _template(args.template)
    path = export_gguf(lm, args.dest, args.quant.lower(), args.name, args.force)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), {Path(args.dest) / 'README.md'} and "
          f"{Path(args.dest) / 'Modelfile'}")


def _args_generate(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("prompt", nargs="*", help="prompt text; '-' reads stdin")
    p.add_argument("--file", "-f", help="read prompts from a file, one per line")
    p.add_argument("--truncate-prompt", choices=["error", "left"], default="error",
                   help="a prompt longer than the context: error (default) or keep its end")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("--stats", action="store_true", help="print prompt and decode tokens/s to stderr")
    _kv_type_arg(p, "(given: the prompts run one after another through a paged KV cache stored so, which "
                    "computes a prefix they share once; default: batched, in the model's dtype)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--json-schema", metavar="SCHEMA", help="the output is JSON valid under this schema "
                                                              "(a .json file, or the schema itself)")
    held.add_argument("--grammar", metavar="FILE", help="the output follows this GBNF grammar (llama.cpp's form)")
    _sampling_args(p)
    _speculation_args(p)


def cmd_generate(args):
    from camelid.generate.oneshot import read_constraint, read_prompts, run_generate

    prompts = read_prompts(args.prompt, args.file)
    constraint = read_constraint(args.json_schema, args.grammar)
    if (args.lookup is not None or args.draft) and (constraint is not None or len(prompts) > 1):
        raise CamelidError("speculative decoding (--lookup, --draft) takes one prompt and no --json-schema or "
                           "--grammar")
    lm = _load(args, seq2seq=True)
    _seq2seq_options(args, lm)
    _glm_options(args, lm)
    params = _params(args)
    run_generate(lm, prompts, params, args.max_new_tokens, args.stop, truncate=args.truncate_prompt,
                 bos=not args.no_bos, show_stats=args.stats, constraint=constraint,
                 speculation=_speculation(args, lm, params), kv_type=args.kv_type)


def _seq2seq_options(args, lm):
    """What an encoder-decoder (T5) does not do yet, refused before it starts."""
    if not lm.config.n_encoder_layers:
        return
    options = {"--lookup": "lookup", "--draft": "draft", "--kv-type": "kv_type", "--json-schema": "json_schema",
               "--grammar": "grammar"}
    asked = [flag for flag, name in options.items() if getattr(args, name, None) is not None]
    if asked:
        raise CamelidError(f"{args.model}: an encoder-decoder model (T5) generates without {asked[0]} (speculative "
                           f"decoding, KV types and grammars take decoder-only models)")


def _glm_options(args, lm):
    """ChatGLM-6B keeps its prompt's positions in its own cache, which speculation and --kv-type replace."""
    from camelid.formats.loaded import require_plain_positions

    asked = [flag for flag, name in (("--lookup", "lookup"), ("--draft", "draft"), ("--kv-type", "kv_type"))
             if getattr(args, name, None) is not None]
    if asked:
        require_plain_positions(lm, args.model, asked[0])


def _args_chat(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--template", default=None, help="override the model's chat template: a built-in name (alpaca, "
                                                    "vicuna, llama2, chatml, llama3, gemma, raw), one of FastChat's "
                                                    "(vicuna_v1.1, one_shot, koala_v1, ...) or a Jinja file")
    _sampling_args(p)
    _speculation_args(p)
    _kv_type_arg(p, "(default: the model's dtype)")


def cmd_chat(args):
    from camelid.chat.repl import chat_loop

    params = _params(args)
    lm = _load(args, seq2seq=True)
    _seq2seq_options(args, lm)
    _glm_options(args, lm)
    chat_loop(lm, params, args.max_new_tokens, args.system, _template(args.template),
              speculation=_speculation(args, lm, params), kv_type=args.kv_type)


def _args_serve(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model name in the API (default: the folder or file name)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every API route. A key on the command line is "
                          "visible to every user of this machine in `ps`: prefer CAMELID_API_KEY or --api-key-file")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="also answer requests whose Host header is this name (repeatable; '*' for any). By "
                        "default only the bound address, and localhost for a loopback one, are answered")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin")
    p.add_argument("--parallel", "-np", "--max-batch", dest="max_batch", type=int, default=8,
                   help="requests decoded together (llama-server's -np)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    _kv_args(p)
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled between two decode steps of running requests (default 256)")
    g = p.add_argument_group("speculative decoding (each request's own text, greedy or sampled, in fewer passes)")
    drafter = g.add_mutually_exclusive_group()
    drafter.add_argument("--lookup", nargs="?", type=int, const=3, default=None, metavar="N",
                         help="draft each request's next tokens by prompt lookup on its last N tokens (default 3), "
                              "verified for the whole batch in one pass: pays when replies repeat their input")
    drafter.add_argument("--draft", default=None, metavar="MODEL",
                         help="a smaller model with the same tokenizer drafts the first model's tokens, every "
                              "row's draft verified in one pass")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per pass (default 4)")
    p.add_argument("--template", default=None,
                   help="the first model's chat template: a built-in name (alpaca, vicuna, llama2, chatml, llama3, "
                        "gemma, raw), one of FastChat's (vicuna_v1.1, one_shot, koala_v1, dolly_v2, ...) or a Jinja "
                        "file (default: the model's own, else FastChat's for its name)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("more_models", nargs="*", metavar="MODEL",
                   help="more models to serve, each MODEL or NAME=MODEL (MODEL may also be a folder of models); "
                        "a request's `model` picks one, the first is the default")
    p.add_argument("--max-models", type=int, default=0,
                   help="models loaded at once; past it the least recently used idle one is unloaded (default: all)")
    p.add_argument("--max-model-memory", type=float, default=0,
                   help="GB of weights and KV caches the loaded models may hold (default: no limit)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="let API clients load and unload LoRA adapters from this machine's folders "
                        "(/v1/load_lora_adapter, vLLM's API)")


def _kv_args(p: argparse.ArgumentParser):
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help="most tokens of one request, prompt and reply (default: the model's context)")
    p.add_argument("--kv-memory", default=None,
                   help="memory of the KV cache shared by all requests, e.g. 2GiB or 512MB (default: --parallel "
                        "requests at --ctx-size); blocks are taken as tokens arrive")
    _kv_type_arg(p, "(default: the model's dtype)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt (by default blocks of earlier prompts are reused)")


def _kv_type_arg(p: argparse.ArgumentParser, default: str):
    p.add_argument("--kv-type", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                   help=f"how keys and values are stored {default}; f16/bf16 take half of f32's memory, q8_0 "
                        f"(llama.cpp's 8-bit blocks) about a quarter of f32's, half of f16's")


def _kv_budget(args):
    from camelid.serve.engine import KVBudget

    if args.ctx_size is not None and args.ctx_size < 1:
        raise CamelidError("--ctx-size must be >= 1")
    return KVBudget(memory=None if args.kv_memory is None else parse_bytes(args.kv_memory, "--kv-memory"),
                    kv_type=args.kv_type)


UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9,
         "gb": 1e9, "gib": 1 << 30}


def parse_bytes(text: str, name: str) -> int:
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise CamelidError(f"{name} {text}: give a size such as 2GiB, 512MB or 1e9") from None
    if value <= 0:
        raise CamelidError(f"{name} {text}: must be more than 0")
    return int(value)


def _served_models(args) -> list[tuple[str, str]]:
    """(name, path) of every model to serve: MODEL, NAME=MODEL, or a folder holding models."""
    from camelid.formats.load import is_model

    out = []
    for i, given in enumerate([args.model] + args.more_models):
        name, _, path = given.rpartition("=") if "=" in given and not Path(given).exists() else ("", "", given)
        if not Path(path).exists():
            raise CamelidError(f"{path}: no such file or directory")
        if Path(path).is_dir() and not is_model(path):
            inside = sorted(p for p in Path(path).iterdir() if is_model(p))
            if not inside:
                raise CamelidError(f"{path}: neither a model nor a folder of models camelid can open")
            out += [(p.name.removesuffix(".gguf").removesuffix(".bin"), str(p)) for p in inside]
            continue
        default = args.name if i == 0 and args.name else Path(path).name.removesuffix(".bin").removesuffix(".gguf")
        out.append((name or default, path))
    return out


def cmd_serve(args):
    import threading
    from functools import partial

    import uvicorn

    from camelid.serve.app import ServerConfig, create_app
    from camelid.serve.listen import KEEP_ALIVE_SECONDS, HeaderTimeoutH11, allowed_hosts, listening_socket
    from camelid.serve.models import Served

    for name in ("max_batch", "max_queue", "max_tokens_limit", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise CamelidError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_models < 0 or args.max_model_memory < 0:
        raise CamelidError("--max-models and --max-model-memory must be >= 0")
    models = _served_models(args)  # fail now, not later in the background loader
    from camelid.formats.load import read_config
    from camelid.formats.loaded import require_plain_positions

    for _, path in models:
        require_plain_positions(read_config(path), path, "`camelid serve`")
    served_adapters = []
    for given in args.adapter:
        if "=" in given:
            adapter_name, _, folder = given.partition("=")
            if not adapter_name or not Path(folder).is_dir():
                raise CamelidError(f"--adapter {given}: give NAME=DIR, DIR an adapter folder")
            served_adapters.append((adapter_name, folder))
    _check_threads(args)
    api_key = _api_key(args)
    sock = listening_socket(args.host, args.port)
    name = models[0][0]
    config = ServerConfig(model_name=name, api_key=api_key, cors_origins=args.cors_origin, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                          allowed_hosts=allowed_hosts(args.host, args.allowed_host), max_models=args.max_models,
                          max_model_bytes=int(args.max_model_memory * 1e9),
                          allow_adapter_loading=args.allow_adapter_loading, ctx_size=args.ctx_size,
                          kv=_kv_budget(args), prefill_chunk=args.prefill_chunk,
                          prefix_cache=not args.no_prefix_cache, lookup=_serve_lookup(args),
                          draft_tokens=args.draft_tokens)
    merged = [a for a in args.adapter if "=" not in a]
    served = []
    for i, (model_name, path) in enumerate(models):  # a merged adapter and served adapters go with the first model
        one = argparse.Namespace(**{**vars(args), "model": path, "adapter": merged if i == 0 else [],
                                    "template": args.template if i == 0 else None})
        served.append(Served(model_name, partial(_load, one, seq2seq=True), served_adapters if i == 0 else [],
                             partial(_load_draft, args) if i == 0 and args.draft else None))
    app = create_app(served, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=HeaderTimeoutH11,
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS))
    state = app.state.camelid

    def stop_if_load_fails():
        state["loaded"].wait()
        if state["error"] is not None:
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, daemon=True).start()
    others = [n for n, _ in models[1:]] + [n for n, _ in served_adapters]
    print(f"camelid serve: {name}{' (and ' + ', '.join(others) + ')' if others else ''} on "
          f"http://{args.host}:{args.port}/ (API at /v1)", file=sys.stderr)
    server.run(sockets=[sock])
    if state["error"] is not None:
        raise CamelidError(f"{models[0][1]}: {state['error']}")


def _api_key(args) -> str | None:
    if args.api_key_file:
        from camelid.files import read_text

        lines = read_text(args.api_key_file).splitlines()
        if not lines or not lines[0].strip():
            raise CamelidError(f"--api-key-file {args.api_key_file}: the file is empty")
        return lines[0].strip()
    key = args.api_key if args.api_key is not None else os.environ.get("CAMELID_API_KEY")
    if key is not None and not key.strip():
        raise CamelidError("--api-key: the key is empty")
    return key


def _args_tokenizer(p: argparse.ArgumentParser):
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE or SentencePiece tokenizer on text files")
    t.add_argument("files", nargs="+", help="text files, JSONL, folders, or a `data prepare` folder")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--kind", default="bpe", choices=["bpe", "sentencepiece-unigram", "sentencepiece-bpe"])
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--special", action="append", default=None, help="special token (default <|endoftext|>)")
    _force_arg(t)


def cmd_tokenizer(args):
    from camelid.data.corpus import list_files, read_texts
    from camelid.tokenizer.train import END_OF_TEXT, train_tokenizer

    list_files(args.files, ())  # a missing path fails before any work
    path = train_tokenizer(read_texts(args.files), args.out, args.kind, args.vocab_size,
                           tuple(args.special or [END_OF_TEXT]), args.force)
    print(f"wrote {path}")


def _args_data(p: argparse.ArgumentParser):
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="clean, filter and deduplicate a raw corpus (text, JSONL, HTML)")
    d.add_argument("inputs", nargs="+", help=".txt/.md files, .jsonl, .html pages, or folders of them")
    d.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, report.json, report.md)")
    d.add_argument("--text-key", default="text", help="the JSONL field holding the text")
    d.add_argument("--val-fraction", type=float, default=0.01)
    d.add_argument("--near-dup", type=float, default=0.8,
                   help="MinHash similarity threshold for near-duplicates (0 turns it off)")
    d.add_argument("--no-exact-dedup", action="store_true")
    d.add_argument("--keep-emoji", action="store_true", help="keep emoji instead of writing their names")
    d.add_argument("--blocklist", default=None, help="file of words or phrases; documents with any are dropped")
    d.add_argument("--min-words", type=int, default=50)
    d.add_argument("--workers", type=int, default=None)
    _force_arg(d)
    d = dsub.add_parser("convert", help="rewrite instruction data as alpaca, dolly, sharegpt or messages")
    d.add_argument("src", help="Alpaca/Dolly JSON or JSONL, ShareGPT JSON, or messages JSONL")
    d.add_argument("dest", help="output file: .jsonl for one record per line, else a JSON array")
    d.add_argument("--to", required=True, choices=["alpaca", "dolly", "sharegpt", "messages"])
    d.add_argument("--from", dest="fmt", default=None, choices=["alpaca", "dolly", "sharegpt", "messages"],
                   help="the input format (default: detected per record)")
    d = dsub.add_parser("show-mask", help="show which tokens of instruction samples (or of preference pairs' "
                                          "chosen and rejected replies) the loss reads")
    d.add_argument("file", help="instruction or chat data (any format `data convert` reads), or preference data")
    d.add_argument("--template", required=True, help="alpaca, vicuna, llama2, chatml, llama3, gemma or Jinja source")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json, a SentencePiece .model, or a model folder")
    d.add_argument("--max-len", type=int, default=2048, help="the training context")
    d.add_argument("--samples", type=int, default=2, help="how many samples to print")
    d.add_argument("--train-on-prompt", action="store_true", help="train on the prompt too")
    d.add_argument("--truncate", action="store_true",
                   help="preference data: cut examples longer than --max-len as `truncate: true` does")
    d = dsub.add_parser("search", help="full-text search of instruction data from the terminal")
    d.add_argument("file", help="instruction or chat data (any format `data convert` reads)")
    d.add_argument("query", help='words, "a phrase", a OR b, prefix*; with --substring, any text')
    d.add_argument("--limit", type=int, default=10)
    d.add_argument("--substring", action="store_true", help="a LIKE '%%text%%' search instead of full-text")
    d = dsub.add_parser("browse", help="open instruction data in Datasette on 127.0.0.1")
    d.add_argument("file", help="instruction or chat data (any format `data convert` reads)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8001)
    d = dsub.add_parser("tokenize", help="text/JSONL files or a prepared folder into train/val token shards")
    d.add_argument("inputs", nargs="+", help=".txt files (paragraphs are documents), .jsonl, or folders")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json or a SentencePiece .model")
    d.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    d.add_argument("--val-fraction", type=float, default=0.01)
    d.add_argument("--workers", type=int, default=None)
    _force_arg(d)


def cmd_data(args):
    if not 0 <= getattr(args, "val_fraction", 0) < 1:
        raise CamelidError("--val-fraction must be in [0, 1)")
    if args.data_command == "prepare":
        return cmd_data_prepare(args)
    if args.data_command == "convert":
        from camelid.data.instruct import convert

        result = convert(args.src, args.dest, args.to, args.fmt)
        print(f"wrote {result['written']} records to {args.dest}"
              + (f"; skipped {result['skipped']}" if result["skipped"] else ""))
        return 0
    if args.data_command == "show-mask":
        return cmd_show_mask(args)
    if args.data_command == "search":
        from camelid.data.explore import search

        if args.limit < 1:
            raise CamelidError("--limit must be at least 1")
        for row in search(args.file, args.query, args.limit, substring=args.substring):
            print(f"#{row['id']}  {row['instruction']}" + (f"\n    input: {row['input']}" if row["input"] else "")
                  + f"\n    -> {row['output'][:300]}\n")
        return 0
    if args.data_command == "browse":
        from camelid.data.explore import browse

        return browse(args.file, args.host, args.port)
    from camelid.data.tokenize import tokenize_corpus

    report = tokenize_corpus(args.inputs, args.tokenizer, args.out, args.val_fraction, args.workers, args.force)
    for split, r in report.items():
        print(f"{split}: {r['documents']} documents, {r['tokens']} tokens -> {Path(args.out) / split}")


def _is_preference_data(path) -> bool:
    from pathlib import Path

    from camelid.data.instruct import _records

    first = next(iter(_records(Path(path))), (None, None))[1]
    return isinstance(first, dict) and ("chosen" in first or "label" in first)


def _show_preference_mask(args, tokenizer):
    """Pairs: the prompt once, then what the loss reads of the chosen and of the rejected reply. KTO: the reply."""
    from camelid.data import preference as pref
    from camelid.data.masking import show_mask

    stats = pref.PreferenceStats()
    records = pref.read_preferences(args.file, None, stats)
    colour = sys.stdout.isatty()
    if records and hasattr(records[0], "desirable"):
        examples = pref.tokenize_unpaired(tokenizer, args.template, records, args.max_len, stats, args.truncate)
        for e in examples[:args.samples]:
            label = "desirable" if e.desirable else "undesirable"
            print(f"--- {e.where} ({label}, {len(e.prompt)} prompt + {len(e.completion)} reply tokens) ---")
            print(show_mask(tokenizer, pref.as_sample(e.prompt, e.completion), colour))
        kept = len(examples)
    else:
        pairs = pref.tokenize_pairs(tokenizer, args.template, records, args.max_len, stats, args.truncate)
        for p in pairs[:args.samples]:
            for name, reply in (("chosen", p.chosen), ("rejected", p.rejected)):
                print(f"--- {p.where} {name} ({len(p.prompt)} prompt + {len(reply)} reply tokens) ---")
                print(show_mask(tokenizer, pref.as_sample(p.prompt, reply), colour))
        kept = len(pairs)
    print(f"\n{stats.records} records -> {kept} usable within {args.max_len} tokens ({stats.truncated} truncated); "
          f"{stats.skipped.total} skipped ({stats.too_long} too long)")


def cmd_show_mask(args):
    from camelid.data.instruct import Skipped, load_conversations
    from camelid.data.masking import MaskStats, mask_conversation, show_mask
    from camelid.tokenizer.chat_template import resolve_template

    if args.max_len < 8:
        raise CamelidError("--max-len must be at least 8")
    tokenizer = _tokenizer_for(args.tokenizer)
    resolve_template(args.template)
    if _is_preference_data(args.file):
        return _show_preference_mask(args, tokenizer)
    skipped, stats, shown = Skipped(), MaskStats(), 0
    for where, conversation in load_conversations(args.file, skipped=skipped):
        for sample in mask_conversation(tokenizer, args.template, conversation, args.max_len, args.train_on_prompt,
                                        stats):
            if shown < args.samples:
                print(f"--- {where} ({len(sample.ids)} tokens"
                      f"{', truncated' if sample.truncated else ''}) ---")
                print(show_mask(tokenizer, sample, colour=sys.stdout.isatty()))
                shown += 1
    print(f"\n{stats.samples} samples -> {stats.pieces} training sequences of at most {args.max_len} tokens; "
          f"{stats.truncated} truncated; {stats.trained_tokens} of {stats.tokens} tokens trained "
          f"({stats.trained_tokens / max(stats.tokens, 1):.0%}); {stats.boundary_merges} turn boundaries "
          f"tokenized apart; {skipped.total} records skipped")


def _tokenizer_for(path: str):
    """A tokenizer file, or the tokenizer of a model folder."""
    from camelid.tokenizer.tokenizer import load_tokenizer_file

    if Path(path).is_dir():
        from camelid.formats.load import load_model

        return load_model(path, "cpu", "fp32").tokenizer
    return load_tokenizer_file(path)


def cmd_data_prepare(args):
    from camelid.data.clean import QualityRules
    from camelid.data.prepare import PrepareOptions, prepare_corpus, report_markdown

    if not 0 <= args.near_dup <= 1:
        raise CamelidError("--near-dup must be in [0, 1]")
    options = PrepareOptions(args.text_key, args.val_fraction, not args.no_exact_dedup, args.near_dup or None,
                             not args.keep_emoji, args.blocklist, QualityRules(min_words=args.min_words),
                             args.workers)
    report = prepare_corpus(args.inputs, args.out, options, args.force)
    print(report_markdown(report).split("## Examples")[0].rstrip())
    print(f"\nwrote {args.out} (examples in {Path(args.out) / 'report.md'})")


def _args_pretrain(p: argparse.ArgumentParser):
    p.add_argument("--config", help="a YAML recipe (see recipes/)")
    p.add_argument("--resume", default=None, help="'auto' (the newest checkpoint in out_dir) or a checkpoint path")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP instead of DDP")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 model.dim=128")


def cmd_pretrain(args):
    from camelid.train.config import load_train_config
    from camelid.train.trainer import train

    cfg = load_train_config(args.config, args.overrides + (["fsdp=true"] if args.fsdp else []))
    folder = train(cfg, args.resume)
    if folder is not None:
        print(f"wrote {folder}")


def _args_finetune(p: argparse.ArgumentParser):
    p.add_argument("--config", help="a YAML recipe (see recipes/alpaca*.yaml, vicuna.yaml)")
    p.add_argument("--resume", default=None, help="'auto' (the newest checkpoint in out_dir) or a checkpoint path")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP instead of DDP")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. base=models/x method=lora")


def cmd_finetune(args):
    from camelid.train.config import FinetuneConfig, load_config
    from camelid.train.finetune import finetune

    folder = finetune(load_config(args.config, args.overrides + (["fsdp=true"] if args.fsdp else []), FinetuneConfig),
                      args.resume)
    if folder is not None:
        print(f"wrote {folder}")


def _args_rlhf(p: argparse.ArgumentParser):
    p.add_argument("--config", help="a YAML recipe (see recipes/rlhf-cpu-demo.yaml)")
    p.add_argument("--resume", default=None, help="'auto' (the newest checkpoint in out_dir) or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. policy=out/sft/model method=rloo")


def cmd_rlhf(args):
    from camelid.train.config import RLHFConfig, load_config
    from camelid.train.rlhf import rlhf

    folder = rlhf(load_config(args.config, args.overrides, RLHFConfig), args.resume)
    if folder is not None:
        print(f"wrote {folder}")


def _args_self_instruct(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="Alpaca JSON to write (an existing one is resumed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local model camelid opens")
    src.add_argument("--endpoint", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--endpoint-model", default="default", help="the model name the endpoint expects")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="for the endpoint (or OPENAI_API_KEY)")
    p.add_argument("--num", type=int, default=100, help="how many new instructions to keep")
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-tasks", default=None, help="seed tasks JSONL (default: Self-Instruct's 175)")
    p.add_argument("--prompt", default=None, help="the generation prompt (default: Alpaca's)")


def cmd_self_instruct(args):
    from camelid.train import self_instruct as si

    if args.num < 1 or args.max_tokens < 16:
        raise CamelidError("--num must be at least 1 and --max-tokens at least 16")
    here = Path(si.__file__).parent / "self_instruct_data"
    complete = (si.local_client(args.model, args.max_tokens, args.seed) if args.model else
                si.endpoint_client(args.endpoint, args.endpoint_model, args.max_tokens, args.api_key))
    report = si.self_instruct(complete, args.seed_tasks or here / "seed_tasks.jsonl",
                              args.prompt or here / "prompt.txt",
                              args.out, args.num, args.seed)
    print(f"kept {report['kept']} instructions after {report['requests']} requests; dropped: {report['dropped']}")
    print(f"wrote {args.out}")


def _args_merge(p: argparse.ArgumentParser):
    p.add_argument("base", help="the base model")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output camelid folder")
    p.add_argument("--template", default=None, help="chat template to store (default: the base model's)")
    _force_arg(p)


def cmd_merge(args):
    from camelid.files import check_output_folder
    from camelid.formats.load import load_model, save_native
    from camelid.formats.peft import load_adapter
    from camelid.model.lora import merge_lora

    check_output_folder(args.out, args.force)
    lm = load_model(args.base, "cpu", None)
    merge_lora(load_adapter(lm.model, args.adapter))
    save_native(lm, args.out, _template(args.template), force=args.force)
    print(f"wrote {args.out}")


def _args_eval(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--tasks", default=None,
                   help="comma-separated: perplexity, arc_easy, arc_challenge, hellaswag, mmlu (or mmlu_<subject>), "
                        "truthfulqa_mc1, truthfulqa_mc2")
    p.add_argument("--suite", default=None, choices=["leaderboard-v1"],
                   help="the Open LLM Leaderboard v1: ARC 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA mc2")
    p.add_argument("--data", nargs="+", default=None, help="perplexity: text files (one document each) or JSONL")
    p.add_argument("--data-dir", default=None,
                   help="folder with the tasks' files (hub parquet/JSON, or e.g. ../shared/data/eval)")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None, help="shots (default: 0, or the suite's)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions of each task")
    p.add_argument("--fewshot-seed", "--seed", type=int, default=1234,
                   help="few-shot sampling seed (lm-eval's default 1234)")
    p.add_argument("--fewshot-sampler", default=None, choices=["lm-eval", "leaderboard-v1"],
                   help="draw shots as lm-eval v0.4 does (default) or as the leaderboard's old harness did")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend the tokenizer's BOS as lm-eval >= 0.4.10 does (off: the leaderboard and <= 0.4.9)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per scoring batch")
    p.add_argument("--protocol", default="harness", choices=["harness", "llamacpp"],
                   help="perplexity: lm-evaluation-harness's rolling windows (default) or llama.cpp's chunks")
    p.add_argument("--max-length", type=int, default=None, help="harness window (default: the model's context)")
    p.add_argument("--ctx", type=int, default=512, help="llama.cpp chunk size")
    p.add_argument("--output", default=None,
                   help="a .json file, or a folder for results_<time>.json (lm-eval's layout)")
    p.add_argument("--log-samples", action="store_true", help="also write samples_<task>_<time>.jsonl")


def cmd_eval(args):
    from camelid.eval import harness
    from camelid.eval.perplexity import evaluate_perplexity
    from camelid.eval.results import merge, write_results
    from camelid.eval.tasks import TASKS
    from camelid.formats.loaded import require_plain_positions

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks and not args.suite:
        raise CamelidError("eval: give --tasks or --suite")
    choice_tasks = [t for t in tasks if t != "perplexity"]
    unknown = [t for t in choice_tasks if t not in TASKS and not t.startswith("mmlu_")]
    if unknown:
        raise CamelidError(f"--tasks: unknown task {unknown[0]!r} (available: perplexity, {', '.join(TASKS)})")
    if "perplexity" in tasks and not args.data:
        raise CamelidError("--tasks perplexity needs --data FILE...")
    if (choice_tasks or args.suite) and not args.data_dir:
        raise CamelidError(f"--tasks {','.join(choice_tasks) or args.suite} needs --data-dir (the tasks' local files)")
    for flag, value, low in (("--max-length", args.max_length, 2), ("--ctx", args.ctx, 2),
                             ("--limit", args.limit, 1), ("--batch-tokens", args.batch_tokens, 1),
                             ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise CamelidError(f"{flag} {value}: must be at least {low}")
    if args.output:  # found now, not after hours of evaluation
        from camelid.files import check_writable

        check_writable(args.output)
    lm = _load(args, seq2seq="perplexity" not in tasks)  # an encoder-decoder scores choices, not running text
    require_plain_positions(lm, args.model, "`camelid eval`")
    results, samples = None, {}
    if "perplexity" in tasks:
        results = evaluate_perplexity(lm, args.data, args.protocol, args.max_length, args.ctx)
    if choice_tasks or args.suite:
        options = dict(limit=args.limit, seed=args.fewshot_seed, bos=args.add_bos, batch_tokens=args.batch_tokens)
        if args.fewshot_sampler:
            options["fewshot_sampler"] = args.fewshot_sampler
        settings = harness.suite_settings(args.suite, args.data_dir, **options) if args.suite else \
            harness.EvalSettings(choice_tasks, args.data_dir, num_fewshot=args.num_fewshot, **options)
        choice_results, samples = harness.evaluate(lm, settings)
        results = merge(results, choice_results)
    results["config"]["model"] = args.model
    print(harness.format_table(results))
    if "leaderboard" in results:
        print("leaderboard-v1: " + ", ".join(f"{k} {v:.2f}" for k, v in results["leaderboard"].items()))
    if args.output:
        paths = write_results(results, args.output, samples if args.log_samples else None, args.model)
        print(f"wrote {paths[0]}" + (f" and {len(paths) - 1} samples files beside it" if len(paths) > 1 else ""))


def _args_leaderboard(p: argparse.ArgumentParser):
    p.add_argument("results", nargs="+", help="results JSON files from camelid eval or lm-eval")
    p.add_argument("--names", default=None, help="comma-separated model names, one per results file")
    p.add_argument("--out", default="leaderboard", help="writes OUT.md, OUT.json and OUT.png (default: leaderboard)")


def cmd_leaderboard(args):
    from camelid.eval.leaderboard import format_leaderboard, leaderboard, write_leaderboard

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    columns, rows = leaderboard(args.results, names)
    print(format_leaderboard(columns, rows))
    print("wrote " + ", ".join(map(str, write_leaderboard(columns, rows, args.out))))


def _args_answer(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--questions", default="mt_bench", help="mt_bench (default), vicuna, or a question.jsonl")
    p.add_argument("--model-id", default=None, help="name in the answers (default: the model folder's name)")
    p.add_argument("--out", default=None, help="answers JSONL (default: answers/<questions>/<model-id>.jsonl)")
    p.add_argument("--template", default=None, help="chat template (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per turn (FastChat's default 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    p.add_argument("--seed", type=int, default=0)


def cmd_answer(args):
    from camelid.eval.answer import answer_questions
    from camelid.eval.questions import load_questions

    questions = load_questions(args.questions)[:args.limit]
    model_id = args.model_id or Path(args.model.rstrip("/")).stem
    bench = Path(args.questions).stem if args.questions.endswith(".jsonl") else args.questions
    out = args.out or Path("answers") / bench / f"{model_id}.jsonl"
    report = answer_questions(_load(args), questions, model_id, out, args.max_new_tokens, args.template,
                              args.batch_size, args.seed)
    print(f"answered {report['answered']} questions ({report['skipped']} already in the file); wrote {report['out']}")


def _args_judge(p: argparse.ArgumentParser):
    p.add_argument("answers", nargs="+", help="answer JSONL files from camelid answer (or FastChat)")
    p.add_argument("--questions", default="mt_bench", help="mt_bench (default), vicuna, or a question.jsonl")
    p.add_argument("--mode", default="single", choices=["single", "pairwise-baseline", "pairwise-all"])
    p.add_argument("--baseline", default=None, help="pairwise-baseline: the model id every other is compared to")
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--judge-url", default=None, help="an OpenAI-compatible server (OpenAI, camelid serve, ...)")
    judge.add_argument("--judge-local", default=None, help="a camelid model folder to judge with")
    p.add_argument("--judge-model", default=None, help="model name sent to --judge-url (default: gpt-4)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="(or set OPENAI_API_KEY)")
    p.add_argument("--references", default=None,
                   help="reference answers for math/reasoning/coding (default: MT-bench's GPT-4 answers)")
    p.add_argument("--judge-prompts", default=None, help="judge_prompts.jsonl (default: FastChat's, bundled)")
    p.add_argument("--out", default="judgments", help="folder for the judgment JSONL, table and chart")
    p.add_argument("--parallel", type=int, default=1, help="judge requests in flight (endpoint judges)")
    p.add_argument("--judge-max-tokens", type=int, default=2048, help="longest judgment (FastChat's 2048)")
    p.add_argument("--device", default="cpu", help="--judge-local: cpu (default), cuda, mps or auto")
    p.add_argument("--dtype", default=None, help="--judge-local: fp32, bf16 or fp16")


def cmd_judge(args):
    from camelid.eval import judge
    from camelid.eval.judge_clients import endpoint_judge, local_judge
    from camelid.eval.questions import load_answers, load_questions, load_references

    if args.parallel < 1 or args.judge_max_tokens < 1:
        raise CamelidError("--parallel and --judge-max-tokens must be at least 1")
    questions = load_questions(args.questions)
    answers = load_answers(args.answers)
    matches = judge.make_matches(questions, answers, load_references(args.references, args.questions),
                                 judge.load_judge_prompts(args.judge_prompts), args.mode, args.baseline)
    if args.judge_url:
        judge_model = args.judge_model or "gpt-4"
        ask = endpoint_judge(args.judge_url, judge_model, args.api_key, args.judge_max_tokens)
    else:
        from camelid.formats.load import load_model

        judge_model = args.judge_model or Path(args.judge_local.rstrip("/")).stem
        lm = load_model(args.judge_local, args.device, args.dtype)
        ask, args.parallel = local_judge(lm, max_tokens=args.judge_max_tokens), 1
    kind = "single" if args.mode == "single" else "pair"
    out = Path(args.out)
    safe = re.sub(r"[^\w.-]+", "_", judge_model)
    rows = judge.judge_matches(ask, judge_model, matches, answers, out / f"{safe}_{kind}.jsonl", args.parallel)
    table = judge.single_scores(rows) if kind == "single" else judge.pairwise_rates(rows, args.baseline)
    print(judge.format_scores(table))
    errors = sum(r["score"] < 0 if kind == "single" else "error" in (r["g1_winner"], r["g2_winner"]) for r in rows)
    if errors:
        print(f"{errors} judgments had no verdict the rules could parse; they are counted as errors, not scores",
              file=sys.stderr)
    paths = judge.write_summary(table, args.mode, out, f"{safe}_{args.mode}")
    print(f"wrote {out / f'{safe}_{kind}.jsonl'}, " + ", ".join(map(str, paths)))


def _args_quantize(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("out", help="output folder (camelid's, or with --format gptq a Hugging Face one)")
    p.add_argument("--mode", default="int4", choices=["int8", "int4"])
    p.add_argument("--group-size", type=int, default=32, help="int4: inputs sharing a scale (32, 64, 128, 256)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="round-to-nearest or GPTQ (int4)")
    p.add_argument("--format", default="camelid", choices=["camelid", "gptq"], dest="layout",
                   help="gptq: a Hugging Face folder in GPTQModel's layout, which transformers, vLLM and TGI load "
                        "(with --method gptq)")
    p.add_argument("--output-mode", default=None, choices=["int8", "int4", "float"],
                   help="the output layer (default int8: llama.cpp's 4-bit files keep it at 6 bits too)")
    p.add_argument("--calibration", nargs="+", default=None, help="GPTQ: text or JSONL files to calibrate on")
    p.add_argument("--samples", type=int, default=128, help="GPTQ: calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="GPTQ: tokens per window")
    p.add_argument("--seed", type=int, default=0)
    _force_arg(p)


def cmd_quantize(args):
    from camelid.files import check_output_folder
    from camelid.formats.load import read_config
    from camelid.quantize import quantize_folder, quantize_while_loading

    if args.samples < 1 or args.seq_len < 2:
        raise CamelidError("--samples must be at least 1 and --seq-len at least 2")
    check_output_folder(args.out, args.force)
    if args.method == "rtn" and args.layout == "camelid" and not args.adapter \
            and not read_config(args.model).tie_embeddings:
        info = quantize_while_loading(args.model, args.out, args.mode, args.group_size, args.output_mode,
                                      args.tokenizer, force=args.force)
    else:  # GPTQ measures the float model's layers; an adapter is merged into the float weights first
        lm = _load(args, decoding=False, seq2seq=args.method == "rtn")  # GPTQ runs a decoder's blocks
        info = quantize_folder(lm, args.out, mode=args.mode, group=args.group_size, method=args.method,
                               calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                               seed=args.seed, output=args.output_mode, force=args.force,
                               layout=args.layout)
    layers = ", ".join(f"{n} {k}" for k, n in info["layers"].items() if n)
    print(f"quantized {layers} layers ({info['method']}); wrote {args.out}")


def _args_sweep(p: argparse.ArgumentParser):
    p.add_argument("--config", help="the recipe to tune (see recipes/)")
    p.add_argument("--out", required=True, help="sweep folder (study.db, trial runs, best.yaml, sweep.png)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=200, help="training steps per trial")
    p.add_argument("--space", default=None, help="YAML search space (default: lr, warmup, batch, weight decay)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")


def cmd_sweep(args):
    from camelid.train.sweep import sweep

    if args.trials < 1 or args.steps < 1:
        raise CamelidError("--trials and --steps must be at least 1")
    result = sweep(args.config, args.overrides, args.out, args.trials, args.steps, args.space)
    print(f"best validation loss {result['best_val_loss']:.4f} with {result['best_params']} "
          f"({result['trials']} trials, {result['pruned']} pruned)")
    print(f"wrote {Path(args.out) / 'best.yaml'} and {Path(args.out) / 'sweep.png'}")


# name -> (its arguments, its handler, its help), in the order `camelid --help` lists them
COMMANDS = {
    "info": (_args_info, cmd_info,
             "architecture, parameters, context and memory of a model or preset"),
    "estimate": (_args_estimate, cmd_estimate,
                 "will a model fit in this machine's memory?"),
    "convert": (_args_convert, cmd_convert,
                "convert between camelid, Hugging Face and llama2.c formats"),
    "export": (_args_export, cmd_export,
               "write a model as GGUF for llama.cpp and Ollama, with a model card"),
    "generate": (_args_generate, cmd_generate,
                 "complete one or more prompts"),
    "chat": (_args_chat, cmd_chat,
             "interactive chat in the terminal"),
    "tokenizer": (_args_tokenizer, cmd_tokenizer,
                  "tokenizer tools"),
    "data": (_args_data, cmd_data,
             "corpus tools"),
    "pretrain": (_args_pretrain, cmd_pretrain,
                 "train a model from scratch on token shards"),
    "finetune": (_args_finetune, cmd_finetune,
                 "instruction-tune (full or LoRA), preference-tune (DPO, IPO, ORPO, SimPO, KTO) or train a reward "
                 "model"),
    "rlhf": (_args_rlhf, cmd_rlhf,
             "tune a policy online against a reward model (GRPO or RLOO)"),
    "self-instruct": (_args_self_instruct, cmd_self_instruct,
                      "generate Alpaca-style instruction data with a model (Self-Instruct)"),
    "apply-delta": (_args_apply_delta, cmd_apply_delta,
                    "a fine-tuned model from its base and published delta weights (Vicuna v0/v1.1)"),
    "merge": (_args_merge, cmd_merge,
              "fold a LoRA adapter (PEFT layout) into its base model"),
    "quantize": (_args_quantize, cmd_quantize,
                 "int8 or int4 weights (round-to-nearest, or GPTQ for int4)"),
    "sweep": (_args_sweep, cmd_sweep,
              "hyperparameter search with short proxy trainings (Optuna)"),
    "eval": (_args_eval, cmd_eval,
             "evaluate a model: perplexity and lm-eval's multiple-choice tasks"),
    "leaderboard": (_args_leaderboard, cmd_leaderboard,
                    "results files side by side: a table and a bar chart PNG"),
    "answer": (_args_answer, cmd_answer,
               "a model's answers to MT-bench or Vicuna-bench questions (FastChat layout)"),
    "judge": (_args_judge, cmd_judge,
              "LLM-as-a-judge over answers: MT-bench single grading or pairwise"),
    "serve": (_args_serve, cmd_serve,
              "OpenAI-compatible API server and web chat page"),
}

if __name__ == "__main__":
    sys.exit(main())
