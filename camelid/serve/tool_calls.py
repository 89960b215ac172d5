"""Tool calls in a model's own syntax (tokenizer/tool_turns.py lists them and renders them into prompts): the
grammar that makes a model call a tool (tool_choice `required` or a named function), and the parse of a reply
into OpenAI's `tool_calls`, as vLLM's parsers read them."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from camelid.generate.constrained import JSON_OPTIONS
from camelid.tokenizer.tool_turns import MISTRAL_MARKER


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str

    def as_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def call_id(syntax: str) -> str:
    if syntax == "mistral":  # Mistral's templates refuse any id but nine letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------- making the model call a tool


def _schema(schema: dict, defs: dict) -> str:
    return json.dumps({**schema, **({"$defs": defs} if defs else {}), "x-guidance": JSON_OPTIONS},
                      ensure_ascii=False)


def _hoisted(tools: list[dict]) -> tuple[list[dict], dict]:
    """Each tool's parameters with its own `$defs` (or `definitions`, as Pydantic writes them) moved to the
    call schema's root under the tool's name, and every `#/$defs/...` reference in it rewritten to match:
    inside the call schema a reference resolves from that root, not from the parameters."""
    params, defs = [], {}
    for t in tools:
        name = t["function"]["name"]
        schema = _prefixed(t["function"].get("parameters") or {"type": "object"}, name)
        defs.update({f"{name}.{k}": v for k, v in {**schema.pop("definitions", {}), **schema.pop("$defs", {})}.items()})
        params.append(schema)
    return params, defs


def _prefixed(node, name: str):
    if isinstance(node, list):
        return [_prefixed(v, name) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: re.sub(r"^#/(?:\$defs|definitions)/", f"#/$defs/{name}.", v) if k == "$ref" and isinstance(v, str)
            else _prefixed(v, name) for k, v in node.items()}


def call_grammar(syntax: str, tools: list[dict], parallel: bool, mistral_marker_id: int | None = None) -> str:
    """A Lark grammar (llguidance's, with inline %json) for replies that are only calls of `tools`, each with
    arguments valid under its parameters' schema: one call, or with `parallel` one or more."""
    key = "parameters" if syntax == "llama3" else "arguments"
    params, defs = _hoisted(tools)
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: p},
                      "required": ["name", key], "additionalProperties": False} for t, p in zip(tools, params)]}
    if syntax in ("hermes", "llama3"):
        call = f'"<tool_call>\\n" %json {_schema(one, defs)} "\\n</tool_call>"' if syntax == "hermes" \
            else f"%json {_schema(one, defs)}"
        more = (' ("\\n" call)*' if syntax == "hermes" else ' ("; " call)*') if parallel else ""
        return f"start: call{more}\ncall: {call}\n"
    calls = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    if syntax == "mistral":
        marker = f"<[{mistral_marker_id}]> " if mistral_marker_id is not None else f'"{MISTRAL_MARKER}" '
        return f"start: {marker}%json {_schema(calls, defs)}\n"
    wrapper = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
               "additionalProperties": False}
    return f"start: %json {_schema(wrapper, defs)}\n"


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
