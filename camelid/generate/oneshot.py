"""`camelid generate`: complete prompts from arguments, a file or stdin, streaming one and batching many."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import read_text
from camelid.formats.loaded import LoadedModel
from camelid.generate import constrained
from camelid.generate.constrained import Constraint
from camelid.generate.generate import KVSession, Stats, generate, stream
from camelid.generate.sampling import SamplingParams


def read_prompts(args: list[str], file: str | None) -> list[str]:
    if file:
        path = Path(file)
        if not path.is_file():
            raise CamelidError(f"{file}: no such prompt file")
        prompts = [line for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            raise CamelidError(f"{file}: no prompts in the file")
        return prompts
    if args == ["-"] or (not args and not sys.stdin.isatty()):
        return [sys.stdin.read()]
    if not args:
        raise CamelidError("generate: give a prompt, --file FILE, or '-' for stdin")
    return [" ".join(args)]


def prompt_ids(lm: LoadedModel, text: str, max_new_tokens: int, truncate: str = "error", bos: bool = True):
    ids = lm.tokenizer.encode(text, bos=bos and lm.tokenizer.add_bos)
    if not ids:
        raise CamelidError("the prompt is empty and the model adds no BOS token")
    limit = lm.config.max_seq_len - min(max_new_tokens, lm.config.max_seq_len // 2)
    if len(ids) > limit and truncate == "left":
        ids = ids[:1] + ids[len(ids) - limit + 1:] if bos and lm.tokenizer.add_bos else ids[-limit:]
    return ids


def read_constraint(json_schema: str | None, grammar: str | None) -> Constraint | None:
    """--json-schema (a file or the schema's text) or --grammar (a GBNF file)."""
    if json_schema is not None:
        path = Path(json_schema)
        text = read_text(path) if not json_schema.lstrip().startswith(("{", "true", "false")) else json_schema
        where = str(path) if text is not json_schema else "--json-schema"
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise CamelidError(f"{where}: not JSON: {exc}") from None
        return constrained.json_schema(schema, where)
    if grammar is not None:
        return constrained.gbnf(read_text(Path(grammar)), grammar)
    return None


def run_generate(lm: LoadedModel, prompts: list[str], params: SamplingParams, max_new_tokens: int,
                 stop: list[str], truncate: str = "error", bos: bool = True, show_stats: bool = False,
                 out=None, constraint: Constraint | None = None, speculation=None, kv_type: str | None = None):
    """With `kv_type` the prompts run one after another through a paged KV session stored that way (a
    prefix they share is computed once); otherwise several prompts are decoded as one batch."""
    out = out or sys.stdout
    ids = [prompt_ids(lm, p, max_new_tokens, truncate, bos) for p in prompts]
    stats = Stats()
    if constraint is not None:
        constrained.check(constraint, lm.tokenizer)
    session = KVSession(lm.model, kv_type=kv_type) if kv_type else None

    def echo(prompt: str) -> str:  # a continuation follows its prompt; an encoder-decoder's reply stands alone
        return "" if lm.config.n_encoder_layers else prompt

    if len(ids) == 1 or session is not None:
        for prompt, one in zip(prompts, ids):
            out.write(echo(prompt))
            for piece in stream(lm, one, max_new_tokens, params, stop, stats, constraint=constraint,
                                speculation=speculation, session=session):
                out.write(piece)
                out.flush()
            out.write("\n")
    else:
        for prompt, c in zip(prompts, generate(lm, ids, max_new_tokens, params, stop, stats, constraint)):
            out.write(echo(prompt) + c.text + "\n")
    if show_stats:
        print(f"prompt: {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_second:.1f} tokens/s; "
              f"generated: {stats.generated_tokens} tokens at {stats.decode_tokens_per_second:.1f} tokens/s",
              file=sys.stderr)
        if speculation is not None:
            s = speculation.stats
            print(f"speculative: {s.accepted} of {s.drafted} drafted tokens accepted "
                  f"({s.acceptance_rate:.0%}) in {s.rounds} passes of the model", file=sys.stderr)
