"""Loss masks for instruction tuning, computed on tokens.

The conversation is rendered with the same template code `camelid chat` uses, one message at a time: the
tokens that rendering message k adds to the tokens of messages[:k] belong to message k, so an assistant
turn's content and its end-of-turn token are trained and everything else is masked. Nothing is found by
searching strings, so a template and tokenizer that merge tokens across a turn boundary cannot shift the
mask (the tokens are then taken turn by turn, counted as `boundary_merges`), and no sample is silently
masked whole.

Conversations longer than the context are split between turns into pieces that fit, as Vicuna did; a single
turn longer than the context is truncated, and counted."""

from __future__ import annotations

from dataclasses import dataclass, field

from camelid.errors import CamelidError
from camelid.tokenizer.chat_template import render_chat
from camelid.tokenizer.tokenizer import Tokenizer
from camelid.tokenizer.tool_turns import render_first, tool_chat

IGNORE = -100  # the label PyTorch's cross_entropy skips


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]  # IGNORE where the loss is masked, else the token itself (shifted at training time)
    truncated: bool = False


@dataclass
class MaskStats:
    samples: int = 0
    pieces: int = 0
    truncated: int = 0
    boundary_merges: int = 0
    trained_tokens: int = 0
    tokens: int = 0
    skipped: dict = field(default_factory=dict)


def turn_tokens(tokenizer: Tokenizer, template: str, conversation: list[dict], train_on_prompt: bool = False,
                stats: MaskStats | None = None) -> list[tuple[bool, list[int]]]:
    """(trained, tokens) for each run of messages that are all trained or all masked. The generation prompt
    that follows a user turn ("ASSISTANT:") belongs to the masked run before the reply. Tools (on the first
    message) are rendered as `camelid serve` renders them for this template; an assistant's calls are trained,
    the tools' results are not."""
    specials = tokenizer.special_tokens_map
    tools = conversation[0].get("tools") if conversation else None
    if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation):
        conversation = [{k: v for k, v in m.items() if k != "tools"} for m in conversation]

        def render(messages, add_generation_prompt):
            return render_first(template, tool_chat(template, messages, tools), specials, add_generation_prompt)
    else:
        def render(messages, add_generation_prompt):
            return render_chat(template, messages, specials, add_generation_prompt=add_generation_prompt)

    def trained(k):
        return train_on_prompt or conversation[k]["role"] == "assistant"

    # Cut only where training starts or stops: fewer cuts, fewer places a tokenizer could merge across.
    cuts = [k for k in range(1, len(conversation)) if trained(k) != trained(k - 1)] + [len(conversation)]
    ids: list[int] = []
    text = ""
    out = []
    for k in cuts:
        cue = k < len(conversation) and conversation[k]["role"] == "assistant"
        new_text = render(conversation[:k], cue)
        if not new_text.startswith(text):
            raise CamelidError("chat template: rendering a conversation changes its earlier turns; "
                               "it cannot be used for training")
        new_ids = tokenizer.encode(new_text, bos=False)
        if new_ids[:len(ids)] == ids:
            added = new_ids[len(ids):]
        else:  # the tokenizer merged across the cut: keep the earlier tokens, tokenize the rest on its own
            added = tokenizer.encode(new_text[len(text):], bos=False)
            if stats:
                stats.boundary_merges += 1
        out.append((trained(k - 1), added))
        ids, text = ids + added, new_text
    return out


def _pack(turns: list[tuple[bool, list[int]]], max_len: int | None) -> Sample:
    ids, labels = [], []
    for trained, tokens in turns:
        ids += tokens
        labels += tokens if trained else [IGNORE] * len(tokens)
    truncated = max_len is not None and len(ids) > max_len
    return Sample(ids[:max_len] if truncated else ids, labels[:max_len] if truncated else labels, truncated)


def mask_conversation(tokenizer: Tokenizer, template: str, conversation: list[dict], max_len: int | None = None,
                      train_on_prompt: bool = False, stats: MaskStats | None = None) -> list[Sample]:
    """Training samples (ids and labels) from one conversation: one, or several when it is too long."""
    samples = [_pack(turn_tokens(tokenizer, template, conversation, train_on_prompt, stats), max_len)]
    if max_len is not None and samples[0].truncated:
        samples = _split(tokenizer, template, conversation, max_len, train_on_prompt, stats)
    if stats:
        stats.samples += 1
        stats.pieces += len(samples)
        for s in samples:
            stats.truncated += s.truncated
            stats.tokens += len(s.ids)
            stats.trained_tokens += sum(label != IGNORE for label in s.labels)
    return [s for s in samples if any(label != IGNORE for label in s.labels)]


def _split(tokenizer, template, conversation, max_len, train_on_prompt, stats) -> list[Sample]:
    """Vicuna's split: pieces of whole user/assistant exchanges (each keeping the system prompt) that fit."""
    system = conversation[:1] if conversation[0]["role"] == "system" else []
    rest = conversation[len(system):]
    tools = {"tools": conversation[0]["tools"]} if "tools" in conversation[0] else {}
    # an exchange: a user turn and what answers it (calls and their results included), up to the next user turn
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] + [len(rest)]
    exchanges = [rest[a:b] for a, b in zip(starts, starts[1:])]

    def piece_sample(messages):
        messages = system + messages
        if tools and "tools" not in messages[0]:  # every piece is rendered with the record's tools
            messages = [{**messages[0], **tools}] + messages[1:]
        return _pack(turn_tokens(tokenizer, template, messages, train_on_prompt, stats), max_len)

    samples, piece = [], []
    for exchange in exchanges:
        candidate = piece_sample(piece + exchange)
        if candidate.truncated and piece:
            samples.append(piece_sample(piece))
            piece, candidate = [], piece_sample(exchange)
        piece += exchange
        if candidate.truncated:  # one exchange longer than the context: keep what fits
            samples.append(candidate)
            piece = []
    if piece:
        samples.append(piece_sample(piece))
    return samples


def show_mask(tokenizer: Tokenizer, sample: Sample, colour: bool = True) -> str:
    """The sample's text with trained tokens marked: green on a terminal, else between ⟦ and ⟧."""
    marks = {True: "\x1b[1;32m", False: "\x1b[0;2m"} if colour else {True: "⟦", False: "⟧"}
    decoder = tokenizer.stream()
    out, trained_run = [], False
    for tid, label in zip(sample.ids, sample.labels):
        trained = label != IGNORE
        if trained != trained_run or (colour and not out):
            out.append(marks[trained])
            trained_run = trained
        special = tid == tokenizer.bos_id or tid in tokenizer.eos_ids
        out.append(tokenizer.special_text(tid) if special else decoder.push(tid))
    out.append(decoder.flush())
    if colour:
        out.append("\x1b[0m")
    elif trained_run:
        out.append("⟧")
    return "".join(out)
