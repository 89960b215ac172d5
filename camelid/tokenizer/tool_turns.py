"""A conversation with tools, as a chat template gets it: the tools in its Jinja `tools` variable when the
template renders them, and otherwise (a template that knows nothing of tools) described in a system message,
with earlier calls and results turned into plain turns in a generic JSON syntax. `camelid serve` renders a
request this way and fine-tuning renders tool-use data the same way, so a model learns the text it is then
prompted with.

The syntax a template teaches its model (serve/tool_calls.py parses it):
- hermes (Hermes 2/3, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated
- llama3 (Llama 3.1-3.3): a JSON object `{"name": ..., "parameters": {...}}`, several joined by `;`
- mistral: `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}`
- generic: `{"tool_calls": [{"name": ..., "arguments": {...}}]}`
"""

from __future__ import annotations

import json
import re

from camelid.errors import CamelidError
from camelid.tokenizer.chat_template import render_chat

MISTRAL_MARKER = "[TOOL_CALLS]"


def syntax_of(template: str) -> str:
    """The tool-call syntax a chat template's source teaches its model."""
    if "<tool_call>" in template:
        return "hermes"
    if MISTRAL_MARKER in template:
        return "mistral"
    if "<|start_header_id|>" in template and "tools" in template:
        return "llama3"
    return "generic"


def takes_tools(template: str) -> bool:
    """Whether the template renders a `tools` list itself (else the tools go in as a system message)."""
    return re.search(r"\btools\b", template) is not None


def generic_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You can call these functions:\n" + listing + "\n\nTo call functions, answer with JSON only: "
            '{"tool_calls": [{"name": <function name>, "arguments": <an object of its arguments>}]}. '
            "Otherwise answer in plain text.")


def as_plain_turns(messages: list[dict]) -> list[dict]:
    """A history with tool calls and tool results, for a template that knows neither: an assistant's calls
    become its text in the generic syntax, and the results that follow them one user turn."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})}
                     for c in m["tool_calls"]]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + text})
        elif m["role"] == "tool":
            named = {"tool_call_id": m["tool_call_id"]} if m.get("tool_call_id") else {}
            result = json.dumps({"tool_result": {**named, "content": m["content"]}}, ensure_ascii=False)
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def tool_chat(template: str, messages: list[dict], tools: list[dict] | None) -> list[tuple[list[dict], dict]]:
    """(messages, extra render_chat arguments) to try in order: the first the template renders is the prompt.
    The second, where there is one, describes the tools in the first user turn (Gemma has no system role)."""
    if takes_tools(template):
        return [(messages, {"tools": tools} if tools else {})]
    messages = as_plain_turns(messages)
    if not tools:
        return [(messages, {})]
    text = generic_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [([{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:], {})]
    candidates = [([{"role": "system", "content": text}] + messages, {})]
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is not None:
        user = list(messages)
        user[first] = {**user[first], "content": text + "\n\n" + user[first]["content"]}
        candidates.append((user, {}))
    return candidates


def render_first(template: str, candidates: list[tuple[list[dict], dict]], special_tokens: dict,
                 add_generation_prompt: bool = True) -> str:
    """The first of tool_chat's candidates the template renders (its error, if none does)."""
    for i, (messages, extra) in enumerate(candidates):
        try:
            return render_chat(template, messages, special_tokens, add_generation_prompt=add_generation_prompt,
                               **extra)
        except CamelidError:
            if i == len(candidates) - 1:
                raise
    raise AssertionError("no candidates")
