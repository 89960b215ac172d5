"""Instruction and chat datasets: Alpaca, Dolly, ShareGPT and OpenAI `messages`, read into one shape.

A sample is a conversation: a list of {"role": "system"|"user"|"assistant"|"tool", "content": str}; an Alpaca
user turn may also carry "input", which the Alpaca template renders in its own section. Tool use (ShareGPT's
`function_call` and `observation` turns, OpenAI's assistant `tool_calls` and `tool` messages) becomes
assistant messages with `tool_calls` and tool messages, and a record's `tools` ride on its first message
(`conversation[0]["tools"]`, which masking hands to the template). Malformed records are reported with their
file and line and skipped, never dropped silently."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from camelid.errors import CamelidError
from camelid.files import atomic_file, parse_json

FORMATS = ("alpaca", "dolly", "sharegpt", "messages")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                   "assistant": "assistant", "system": "system", "function_call": "assistant", "observation": "tool"}


@dataclass
class Skipped:
    """Records that could not be read: counted by reason, each also printed with its place."""
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, where: str, reason: str, quiet: bool = False):
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if not quiet:
            print(f"camelid: skipping {where}: {reason}", file=sys.stderr)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) from a JSON array or JSONL file, where = "FILE:LINE" (plus the record's number in an
    array, whose records may share a line); JSON that does not parse is an error naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CamelidError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CamelidError(f"{path}: not UTF-8 text") from None
    stripped = text.lstrip()
    decoder = json.JSONDecoder()
    if stripped.startswith("["):
        i, number = text.index("[") + 1, 0
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                return
            try:
                record, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise CamelidError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise CamelidError(f"{path}:{text.count(chr(10), 0, i) + 1}: JSON nested too deeply") from None
            number += 1
            yield f"{path}:{text.count(chr(10), 0, i) + 1} (record {number})", record
            i = end
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", parse_json(line, path, n)


def _text(value, what: str) -> str:
    """A message's content: a string, or OpenAI-style parts [{"type": "text", "text"|"value": ...}]."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", p.get("value", ""))) for p in value)
    raise ValueError(f"{what} is not text")


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "dolly" if "response" in record or "context" in record else "alpaca"
    return None


def to_conversation(record, fmt: str | None = None) -> list[dict]:
    """One record in any supported format as a conversation; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    fmt = fmt or detect_format(record)
    if fmt == "alpaca":
        user = {"role": "user", "content": _text(record["instruction"], "instruction")}
        if record.get("input"):
            user["input"] = _text(record["input"], "input")
        conversation = [user, {"role": "assistant", "content": _text(record["output"], "output")}]
    elif fmt == "dolly":
        user = {"role": "user", "content": _text(record["instruction"], "instruction")}
        if record.get("context"):
            user["input"] = _text(record["context"], "context")
        conversation = [user, {"role": "assistant", "content": _text(record["response"], "response")}]
    elif fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' is not a list")
        conversation = []
        for i, t in enumerate(turns):
            kind = str(t.get("from", "")).lower() if isinstance(t, dict) else ""
            role = _SHAREGPT_ROLES.get(kind)
            if role is None:
                raise ValueError(f"conversations[{i}] has no known 'from' (human, gpt, system, function_call "
                                 "or observation)")
            text = _text(t.get("value"), f"conversations[{i}].value")
            conversation.append(_tool_call(text, f"conversations[{i}]") if kind == "function_call"
                                else {"role": role, "content": text})
    elif fmt == "messages":
        turns = record["messages"]
        if not isinstance(turns, list):
            raise ValueError("'messages' is not a list")
        conversation = []
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}] has no role system, user, assistant or tool")
            message = {"role": m["role"], "content": _text(m.get("content") or "", f"messages[{i}].content")}
            if m["role"] == "assistant" and m.get("tool_calls"):
                message["tool_calls"] = _calls(m["tool_calls"], f"messages[{i}].tool_calls")
            conversation.append(message)
    else:
        raise ValueError("not Alpaca (instruction, output), Dolly (instruction, response), ShareGPT "
                         "(conversations) or messages")
    tools = _tools(record["tools"]) if fmt in ("sharegpt", "messages") and record.get("tools") else []
    if tools:
        conversation[0]["tools"] = tools
    check_conversation(conversation)
    return conversation


def _tool_call(text: str, where: str) -> dict:
    """A function_call turn's JSON ({"name", "arguments"}) as an assistant message's tool call."""
    try:
        call = json.loads(text)
    except ValueError:
        raise ValueError(f"{where}: a function call that is not JSON") from None
    return {"role": "assistant", "content": "", "tool_calls": _calls([call], where)}


def _calls(calls, where: str) -> list[dict]:
    """Tool calls as chat templates read them: {"type": "function", "function": {"name", "arguments": {...}}}."""
    if not isinstance(calls, list):
        raise ValueError(f"{where}: tool calls are a list")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        args = function.get("arguments", {}) if isinstance(function, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(args, dict):
            raise ValueError(f"{where}: a tool call needs a name and an object of arguments")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": args},
                    **({"id": call["id"]} if isinstance(call.get("id"), str) else {})})
    return out


def _tools(tools) -> list[dict]:
    """A record's tools (a list, or the JSON text of one; bare functions or {"type": "function", ...}) in the
    OpenAI shape templates are given."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise ValueError("'tools' is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("'tools' is not a list of functions")
    out = []
    for t in tools:
        function = t.get("function", t)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("'tools': a function without a name")
        out.append({"type": "function", "function": function})
    return out


def check_conversation(conversation: list[dict]):
    turns = [m["role"] for m in conversation if m["role"] != "system"]
    if "assistant" not in turns:
        raise ValueError("no assistant turn to learn from")
    for i, m in enumerate(conversation):
        if m["role"] == "tool" and (i == 0 or conversation[i - 1]["role"] not in ("assistant", "tool")
                                    or not any(c.get("tool_calls") for c in conversation[:i])):
            raise ValueError(f"turn {i}: a tool's result must follow a call")
    # tool results (one per call, several after parallel calls) stand where a user turn would
    roles = ["user" if r == "tool" else r for i, r in enumerate(turns) if not (r == "tool" and turns[i - 1] == "tool")]
    if roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        raise ValueError("turns must alternate user, assistant, user, ...")
    if any(m["role"] == "system" for m in conversation[1:]):
        raise ValueError("a system message may only come first")
    if not any(m["content"].strip() or m.get("tool_calls") for m in conversation if m["role"] == "assistant"):
        raise ValueError("the assistant turns are empty")


def read_conversations(path: str | Path, fmt: str | None = None, skipped: Skipped | None = None
                       ) -> Iterator[tuple[str, list[dict]]]:
    """(file:line, conversation) for each readable record; the others go to `skipped`."""
    if fmt is not None and fmt not in FORMATS:
        raise CamelidError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    skipped = skipped if skipped is not None else Skipped()
    path = Path(path)
    for where, record in _records(path):
        try:
            yield where, to_conversation(record, fmt)
        except KeyError as exc:
            skipped.add(where, f"missing field {exc.args[0]!r}")
        except ValueError as exc:
            skipped.add(where, str(exc))


def load_conversations(path: str | Path, fmt: str | None = None, skipped: Skipped | None = None
                       ) -> list[tuple[str, list[dict]]]:
    data = list(read_conversations(path, fmt, skipped))
    if not data:
        raise CamelidError(f"{path}: no usable records (an empty dataset, or every record was malformed)")
    return data


def from_conversation(conversation: list[dict], fmt: str) -> dict:
    """A conversation written in `fmt`; ValueError when the format cannot hold it (Alpaca is one turn)."""
    if fmt in ("alpaca", "dolly"):
        turns = [m for m in conversation if m["role"] != "system"]
        if len(turns) != 2:
            raise ValueError(f"{len(turns) // 2} turns do not fit the single-turn {fmt} format")
        keys = ("instruction", "input", "output") if fmt == "alpaca" else ("instruction", "context", "response")
        return dict(zip(keys, (turns[0]["content"], turns[0].get("input", ""), turns[1]["content"])))
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": names[m["role"]], "value": _with_input(m)} for m in conversation]}
    return {"messages": [{"role": m["role"], "content": _with_input(m)} for m in conversation]}


def _with_input(message: dict) -> str:
    """Formats without an input field carry it after the instruction, as Alpaca's own data does."""
    return message["content"] + ("\n\n" + message["input"] if message.get("input") else "")


def convert(src: str | Path, dest: str | Path, to: str, fmt: str | None = None) -> dict:
    """Rewrite a dataset in another format: JSONL for sharegpt/messages, a JSON array for alpaca/dolly."""
    if to not in FORMATS:
        raise CamelidError(f"--to {to!r}: use one of {', '.join(FORMATS)}")
    skipped = Skipped()
    rows = []
    for where, conversation in load_conversations(src, fmt, skipped):
        try:
            rows.append(from_conversation(conversation, to))
        except ValueError as exc:
            skipped.add(where, str(exc))
    if not rows:
        raise CamelidError(f"{src}: no record can be written as {to}")
    dest = Path(dest)
    with atomic_file(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if dest.suffix == ".jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    return {"written": len(rows), "skipped": skipped.reasons}
