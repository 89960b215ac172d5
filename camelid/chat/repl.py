"""`camelid chat`: an interactive terminal chat that keeps the conversation and streams the replies."""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from camelid.errors import CamelidError
from camelid.formats.loaded import LoadedModel
from camelid.generate.generate import Completion, KVSession, Stats, stream
from camelid.generate.sampling import SamplingParams
from camelid.tokenizer.chat_template import render_chat, resolve_template

HELP = "/reset clears the conversation, /system TEXT sets the system prompt, /exit quits"


def chat_prompt(lm: LoadedModel, messages: list[dict], template: str, max_new_tokens: int) -> tuple[list[int], int]:
    """Token ids of the conversation, dropping the oldest turns (never the system prompt) to leave room
    for the reply. Returns the ids and how many messages were dropped."""
    dropped = 0
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        text = render_chat(template, system + turns, lm.tokenizer.special_tokens_map, add_generation_prompt=True)
        ids = lm.tokenizer.encode(text, bos=False)
        if len(ids) + min(max_new_tokens, 64) <= lm.config.max_seq_len or len(turns) <= 1:
            return ids, dropped
        turns = turns[2:] if len(turns) > 2 else turns[1:]
        dropped += 2


def chat_loop(lm: LoadedModel, params: SamplingParams, max_new_tokens: int = 512, system: str | None = None,
              template: str | None = None, read: Callable[[str], str] = input, out: TextIO | None = None,
              speculation=None, kv_type: str | None = None):
    """Each turn re-renders the conversation, as the template defines it; the turns before it are found in
    the KV session's prefix cache, so only the new ones are prefilled (not with speculative decoding, which
    keeps its own caches)."""
    out = out or sys.stdout
    # (an encoder-decoder reads the whole conversation afresh each turn: its encoder sees every token at once;
    # so does ChatGLM-6B, whose context attends both ways, as THUDM's chat() does)
    fresh = lm.config.n_encoder_layers or lm.config.positions == "glm_2d"
    session = KVSession(lm.model, kv_type=kv_type) if speculation is None and not fresh else None
    template = template or lm.template
    _, template_stops = resolve_template(template)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    out.write(f"camelid chat — {lm.source} (template: {template if len(template) < 40 else 'model'}). {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            out.write("(conversation cleared)\n")
            continue
        if cmd.startswith("/system"):
            text = cmd[len("/system"):].strip()
            messages = ([{"role": "system", "content": text}] if text else []) + \
                [m for m in messages if m["role"] != "system"]
            out.write("(system prompt set)\n" if text else "(system prompt cleared)\n")
            continue
        if cmd.startswith("/"):
            out.write(f"unknown command {cmd.split()[0]}; {HELP}\n")
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids, dropped = chat_prompt(lm, messages, template, max_new_tokens)
        except CamelidError as exc:
            messages.pop()
            out.write(f"error: {exc}\n")
            continue
        if dropped:
            out.write(f"(the oldest {dropped} messages no longer fit the context and were left out)\n")
        stats, completion = Stats(), Completion()
        try:
            for piece in stream(lm, ids, max_new_tokens, params, template_stops, stats, completion,
                                speculation=speculation, session=session):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        except CamelidError as exc:
            messages.pop()
            out.write(f"error: {exc}\n")
            continue
        messages.append({"role": "assistant", "content": completion.text.strip()})
        reused = f", {stats.cached_tokens} of {stats.prompt_tokens} prompt tokens cached" if session else ""
        out.write(f"\n[{stats.generated_tokens} tokens, {stats.decode_tokens_per_second:.1f} tokens/s{reused}]\n")
