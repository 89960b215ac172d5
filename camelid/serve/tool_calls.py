"""Tool calls in a model's own syntax: which syntax a chat template teaches, the grammar that makes a model call
a tool (tool_choice `required` or a named function), and the parse of a reply into OpenAI's `tool_calls`.

The syntaxes, as the models' templates and vLLM's parsers have them:
- hermes (Hermes 2/3, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated
- llama3 (Llama 3.1-3.3): a JSON object `{"name": ..., "parameters": {...}}`, several joined by `;`
- mistral: `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}`
- generic (a template that knows nothing of tools): the tools are described in a system message and the model
  answers `{"tool_calls": [{"name": ..., "arguments": {...}}]}`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from camelid.generate.constrained import JSON_OPTIONS

MISTRAL_MARKER = "[TOOL_CALLS]"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


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
            result = json.dumps({"tool_result": {"tool_call_id": m.get("tool_call_id"), "content": m["content"]}},
                                ensure_ascii=False)
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]


def call_id(syntax: str) -> str:
    if syntax == "mistral":  # Mistral's templates refuse any id but nine letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------- making the model call a tool


def _schema(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def call_grammar(syntax: str, tools: list[dict], parallel: bool, mistral_marker_id: int | None = None) -> str:
    """A Lark grammar (llguidance's, with inline %json) for replies that are only calls of `tools`, each with
    arguments valid under its parameters' schema: one call, or with `parallel` one or more."""
    key = "parameters" if syntax == "llama3" else "arguments"
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        key: t["function"].get("parameters") or {"type": "object"}},
                      "required": ["name", key], "additionalProperties": False} for t in tools]}
    if syntax in ("hermes", "llama3"):
        call = f'"<tool_call>\\n" %json {_schema(one)} "\\n</tool_call>"' if syntax == "hermes" \
            else f"%json {_schema(one)}"
        more = (' ("\\n" call)*' if syntax == "hermes" else ' ("; " call)*') if parallel else ""
        return f"start: call{more}\ncall: {call}\n"
    calls = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    if syntax == "mistral":
        marker = f"<[{mistral_marker_id}]> " if mistral_marker_id is not None else f'"{MISTRAL_MARKER}" '
        return f"start: {marker}%json {_schema(calls)}\n"
    wrapper = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
               "additionalProperties": False}
    return f"start: %json {_schema(wrapper)}\n"


# ---------------------------------------------------------------- reading the reply


OPENINGS = {"llama3": ("{",), "mistral": (MISTRAL_MARKER, "["), "generic": ("{", "```")}


def call_start(syntax: str, text: str) -> int | None:
    """Where the first tool call begins in `text` (None: none does, or not yet), so a stream can send the
    content before it and hold back the rest."""
    if syntax == "hermes":
        i = text.find("<tool_call>")
        return i if i >= 0 else None
    stripped = text.lstrip()
    return len(text) - len(stripped) if stripped.startswith(OPENINGS[syntax]) else None


def _held_back(syntax: str, text: str) -> int:
    """How many characters at the end of `text` (no call found in it) could still become the start of one."""
    if syntax == "hermes":
        return next((len(text) - i for i in range(max(0, len(text) - 10), len(text))
                     if "<tool_call>".startswith(text[i:])), 0)
    stripped = text.strip()
    return len(text) if not stripped or any(o.startswith(stripped) for o in OPENINGS[syntax]) else 0


class CallStream:
    """A streamed reply split into content that can be sent now and a held-back part that may be tool calls:
    content streams as it comes, and the calls (whole, once the reply ends) become tool_calls deltas."""

    def __init__(self, syntax: str, names: set[str]):
        self.syntax, self.names = syntax, names
        self.text, self.sent, self.call_at = "", 0, None

    def push(self, piece: str) -> str:
        self.text += piece
        if self.call_at is not None:
            return ""
        start = call_start(self.syntax, self.text) if self.sent == 0 or self.syntax == "hermes" else None
        if start is not None:
            self.call_at = start
            out, self.sent = self.text[self.sent:start], start
            return out
        end = len(self.text) - _held_back(self.syntax, self.text) if self.sent == 0 or self.syntax == "hermes" \
            else len(self.text)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, the calls) once the reply is complete."""
        if self.call_at is not None:
            content, calls = parse(self.syntax, self.text[self.call_at:], self.names)
            if calls:
                return content, calls
        return self.text[self.sent:], []


def parse(syntax: str, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(the content, the calls) of a reply. A reply whose call part does not parse, or calls a function that
    was not offered, is content: the client sees what the model wrote."""
    start = call_start(syntax, text)
    if start is None:
        return text, []
    content, rest = text[:start], text[start:]
    found = _calls(syntax, rest)
    if not found or any(not isinstance(name, str) or name not in names for name, _ in found):
        return text, []
    return content.strip(), [ToolCall(name, json.dumps(args, ensure_ascii=False), call_id(syntax))
                             for name, args in found]


def _calls(syntax: str, text: str) -> list[tuple[str, dict]] | None:
    if syntax == "hermes":
        bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S)
        if re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S).strip():
            return None  # text after the calls: not a clean call
        items = [_json(b) for b in bodies]
    elif syntax == "llama3":
        items = _json_sequence(text.strip(), ";")
    elif syntax == "mistral":
        items = _json(text.strip().removeprefix(MISTRAL_MARKER))
    else:
        body = _json(re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip()))
        items = body.get("tool_calls", [body.get("tool_call")] if "tool_call" in body else body) \
            if isinstance(body, dict) and ("tool_calls" in body or "tool_call" in body) else body
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        return None
    out = []
    for item in items:
        args = item.get("arguments", item.get("parameters")) if isinstance(item, dict) else None
        if isinstance(args, str):
            args = _json(args)
        if not isinstance(args, dict) or "name" not in item:
            return None
        out.append((item["name"], args))
    return out


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_sequence(text: str, separator: str) -> list | None:
    """JSON values one after another, with `separator` between them."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)
        rest = text[i:].lstrip()
        if rest.startswith(separator):
            rest = rest[len(separator):].lstrip()
        i = len(text) - len(rest)
    return out
