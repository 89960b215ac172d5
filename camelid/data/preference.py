"""Preference data: pairs of a prompt with a chosen and a rejected reply (DPO and its kin, reward models) and
KTO's unpaired replies labelled desirable or not, read from the formats people have and tokenized with the
masks instruction tuning uses.

Pairs come as TRL's standard form ({"prompt", "chosen", "rejected"} strings), its conversational form (message
lists, the prompt explicit or the shared start of the two conversations), or ShareGPT `conversations` with a
`chosen` and a `rejected` message (LLaMA-Factory's). Unpaired examples are TRL's {"prompt", "completion",
"label"} or `messages` whose last assistant turn is labelled. Malformed records are reported with file and
line and skipped, as instruction data is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from camelid.data.instruct import _SHAREGPT_ROLES, Skipped, _records, _text, check_conversation
from camelid.data.masking import IGNORE, Sample, turn_tokens
from camelid.errors import CamelidError
from camelid.tokenizer.tokenizer import Tokenizer


@dataclass
class Pair:
    """A prompt (a conversation ending with a user turn) and two replies to it."""
    where: str
    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass
class Unpaired:
    """KTO's example: a prompt, one reply, and whether the reply is desirable."""
    where: str
    prompt: list[dict]
    completion: str
    desirable: bool


@dataclass
class TokenizedPair:
    """Token ids of the rendered prompt (everything before the reply) and of each reply (its content and the
    end of its turn: the tokens SFT would train)."""
    where: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class TokenizedUnpaired:
    where: str
    prompt: list[int]
    completion: list[int]
    desirable: bool


@dataclass
class PreferenceStats:
    records: int = 0
    too_long: int = 0  # skipped: longer than max_len
    truncated: int = 0  # cut to fit max_len (with truncate)
    skipped: Skipped = field(default_factory=Skipped)


def _message(m, what: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{what} is not a message")
    if "from" in m:  # ShareGPT
        role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise ValueError(f"{what} has no known 'from' (human, gpt or system)")
        return {"role": role, "content": _text(m.get("value"), f"{what}.value")}
    if m.get("role") not in ("system", "user", "assistant"):
        raise ValueError(f"{what} has no role system, user or assistant")
    return {"role": m["role"], "content": _text(m.get("content"), f"{what}.content")}


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list):
        raise ValueError(f"'{what}' is not a list of messages")
    return [_message(m, f"{what}[{i}]") for i, m in enumerate(value)]


def _reply(value, what: str) -> str:
    """A reply: a string, an assistant message, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value if isinstance(value, list) else [value], what)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"'{what}' must be one assistant message")
    return messages[0]["content"]


def _prompt(value, what: str = "prompt") -> list[dict]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, what)


def _check_prompt(prompt: list[dict]):
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    check_conversation(prompt + [{"role": "assistant", "content": "x"}])


def to_pair(record, where: str) -> Pair:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError("a preference pair needs 'chosen' and 'rejected'")
    if "conversations" in record:
        prompt = _messages(record["conversations"], "conversations")
        if isinstance(record.get("system"), str) and record["system"]:
            prompt = [{"role": "system", "content": record["system"]}] + prompt
        chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    elif "prompt" in record:
        prompt = _prompt(record["prompt"])
        chosen, rejected = _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected")
    else:  # TRL's implicit prompt: two whole conversations that differ in their last reply
        c, r = _messages(record["chosen"], "chosen"), _messages(record["rejected"], "rejected")
        if len(c) != len(r) or c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise ValueError("without 'prompt', 'chosen' and 'rejected' must be conversations that differ only in "
                             "their last (assistant) message")
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    _check_prompt(prompt)
    if not chosen.strip() or not rejected.strip():
        raise ValueError(f"the {'chosen' if not chosen.strip() else 'rejected'} reply is empty")
    if chosen == rejected:
        raise ValueError("the chosen and rejected replies are the same")
    return Pair(where, prompt, chosen, rejected)


def to_unpaired(record, where: str) -> Unpaired:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    label = record.get("label")
    if not isinstance(label, bool):
        raise ValueError("an unpaired example needs a boolean 'label' (desirable or not)")
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        messages = _messages(record[key], key)
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"the last of '{key}' must be the assistant reply the label judges")
        prompt, completion = messages[:-1], messages[-1]["content"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = _prompt(record["prompt"]), _reply(record["completion"], "completion")
    else:
        raise ValueError("not KTO data: 'messages' ending with the reply, or 'prompt' and 'completion', and 'label'")
    _check_prompt(prompt)
    if not completion.strip():
        raise ValueError("the reply is empty")
    return Unpaired(where, prompt, completion, label)


def read_preferences(path, unpaired: bool | None, stats: PreferenceStats) -> list[Pair] | list[Unpaired]:
    """Every usable record of a JSON array or JSONL file; the others are reported and counted. `unpaired`
    None: as the first record is (a 'label' makes KTO data)."""
    out = []
    parse = to_unpaired if unpaired else to_pair
    for where, record in _records(Path(path)):
        if unpaired is None:
            unpaired = isinstance(record, dict) and "label" in record and "chosen" not in record
            parse = to_unpaired if unpaired else to_pair
        stats.records += 1
        try:
            out.append(parse(record, where))
        except KeyError as exc:
            stats.skipped.add(where, f"missing field {exc.args[0]!r}")
        except ValueError as exc:
            stats.skipped.add(where, str(exc))
    if not out:
        raise CamelidError(f"{path}: no usable {'KTO examples' if unpaired else 'preference pairs'} (an empty "
                           "dataset, or every record was malformed)")
    return out


def reply_tokens(tokenizer: Tokenizer, template: str, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the conversation is masked exactly as instruction tuning masks it, and the
    last trained run (the reply and its end of turn) is the reply; everything before it is the prompt."""
    runs = turn_tokens(tokenizer, template, prompt + [{"role": "assistant", "content": reply}])
    if not runs or not runs[-1][0] or not runs[-1][1]:
        raise ValueError("the chat template renders no tokens for the reply")
    return [t for _, tokens in runs[:-1] for t in tokens], runs[-1][1]


def _fit(where: str, prompt: list[int], replies: list[list[int]], max_len: int, truncate: bool,
         stats: PreferenceStats):
    """The prompt and replies within max_len, or None (counted) when they are longer and not to be cut. Cut as
    TRL cuts: the prompt keeps its last tokens (at most half of max_len), each reply its first."""
    longest = len(prompt) + max(map(len, replies))
    if longest <= max_len:
        return prompt, replies
    if not truncate:
        stats.too_long += 1
        stats.skipped.add(where, f"prompt and reply are {longest} tokens, more than max_len {max_len} "
                          "(truncate: true cuts such examples to fit)", quiet=stats.too_long > 5)
        return None
    stats.truncated += 1
    prompt = prompt[-(max_len - min(max(map(len, replies)), max_len // 2)):]
    return prompt, [r[:max_len - len(prompt)] for r in replies]


def tokenize_pairs(tokenizer: Tokenizer, template: str, pairs: list[Pair], max_len: int, stats: PreferenceStats,
                   truncate: bool = False) -> list[TokenizedPair]:
    out = []
    for p in pairs:
        # The prompt's tokens are those of its own rendering, whatever reply follows: the same for both.
        prompt, chosen = reply_tokens(tokenizer, template, p.prompt, p.chosen)
        _, rejected = reply_tokens(tokenizer, template, p.prompt, p.rejected)
        fitted = _fit(p.where, prompt, [chosen, rejected], max_len, truncate, stats)
        if fitted is None:
            continue
        prompt, (chosen, rejected) = fitted
        if rejected == chosen:
            stats.skipped.add(p.where, "the chosen and rejected replies tokenize the same way"
                              + (" within max_len" if truncate else ""))
            continue
        out.append(TokenizedPair(p.where, prompt, chosen, rejected))
    return out


def tokenize_unpaired(tokenizer: Tokenizer, template: str, examples: list[Unpaired], max_len: int,
                      stats: PreferenceStats, truncate: bool = False) -> list[TokenizedUnpaired]:
    out = []
    for e in examples:
        prompt, completion = reply_tokens(tokenizer, template, e.prompt, e.completion)
        fitted = _fit(e.where, prompt, [completion], max_len, truncate, stats)
        if fitted is not None:
            out.append(TokenizedUnpaired(e.where, fitted[0], fitted[1][0], e.desirable))
    return out


def as_sample(prompt: list[int], reply: list[int]) -> Sample:
    """The prompt and a reply as an SFT sample (the reply trained), for `camelid data show-mask`."""
    return Sample(prompt + reply, [IGNORE] * len(prompt) + reply)


def to_prompt(record, where: str) -> list[dict]:
    """The prompt of any record RL can start from: TRL's prompt-only {"prompt"}, a preference pair, a KTO
    example, or an instruction record (everything before its last assistant turn)."""
    from camelid.data.instruct import to_conversation

    if isinstance(record, dict) and "chosen" in record:
        return to_pair(record, where).prompt
    if isinstance(record, dict) and "label" in record:
        return to_unpaired(record, where).prompt
    if isinstance(record, dict) and "prompt" in record:
        prompt = _prompt(record["prompt"])
    else:
        conversation = to_conversation(record)
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        prompt = conversation[:last]
    _check_prompt(prompt)
    return prompt


def read_prompts(path, stats: PreferenceStats) -> list[tuple[str, list[dict]]]:
    out = []
    for where, record in _records(Path(path)):
        stats.records += 1
        try:
            out.append((where, to_prompt(record, where)))
        except KeyError as exc:
            stats.skipped.add(where, f"missing field {exc.args[0]!r}")
        except ValueError as exc:
            stats.skipped.add(where, str(exc))
    if not out:
        raise CamelidError(f"{path}: no usable prompts (an empty dataset, or every record was malformed)")
    return out
