"""Chat templates: Jinja rendered exactly as transformers' `apply_chat_template`, plus the classic formats.

The built-in formats are Jinja too, so one renderer serves a model's own `chat_template` and the formats
that predate it (Alpaca, Vicuna v1.1, Llama-2 chat, ChatML, and FastChat's, from fastchat_formats.py).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from camelid.errors import CamelidError
from camelid.tokenizer.fastchat_formats import ALIASES, FORMATS, fastchat_template

_ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.")
_ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.")

# name -> (jinja template, stop strings). Alpaca and Vicuna follow the Stanford and FastChat code byte for byte.
BUILTIN_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "alpaca": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set preamble = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}"
        "{% if loop_messages and loop_messages[0].get('input') %}{% set preamble = '" + _ALPACA_INPUT_PREAMBLE + "' %}"
        "{% else %}{% set preamble = '" + _ALPACA_PREAMBLE + "' %}{% endif %}{% endif %}"
        "{{ preamble }}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
        "{% if message.get('input') %}{{ '\\n\\n### Input:\\n' + message['input'] }}{% endif %}"
        "{{ '\\n\\n### Response:' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}",
        ["### Instruction:"],
    ),
    "vicuna": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = 'A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{{ system + ' ' }}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
        ["USER:"],
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}",
        [],
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ["<|im_end|>"],
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ["<|eot_id|>"],
    ),
    # Gemma's turns (as Gemma 3's own template: a system message opens the first user turn)
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ["<end_of_turn>"],
    ),
    # GLM-4's turns, as llama.cpp's built-in chatglm4 writes them: no end-of-turn token, a reply ends where the model
    # starts the next turn
    "chatglm4": (
        "[gMASK]<sop>"
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        ["<|user|>", "<|observation|>", "<|endoftext|>"],
    ),
    # ChatGLM-6B's rounds, as THUDM's chat() writes them; the prompt ends with [gMASK] <sop>, which its tokenizer
    # appends (a system message, which it never had, goes first on its own line, as FastChat writes one)
    "chatglm": (
        "{% set ns = namespace(round=0) %}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[Round ' ~ ns.round ~ ']\n问：' + message['content'] + '\n答：' }}"
        "{% set ns.round = ns.round + 1 %}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[gMASK]<sop>' }}{% endif %}",
        ["<eop>"],
    ),
    # Base models: the conversation is plain text continued by the model.
    "raw": ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}", []),
}


class _GenerationTag(Extension):
    """transformers' `{% generation %}` block (marks assistant text); rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# A model's template is code from its author: the sandbox keeps it from the system, and these bounds keep
# it from taking the process's time or memory (a server renders it for every request).
RENDER_SECONDS = 2.0
MAX_VALUE_SIZE = 1 << 24  # elements one `*` may build
_deadline = threading.local()


def _tick():
    if time.monotonic() > getattr(_deadline, "at", float("inf")):
        raise SecurityError(f"rendering took longer than {RENDER_SECONDS:g} s")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError("an exponent over 1024")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_VALUE_SIZE:
                raise SecurityError(f"a value of over {MAX_VALUE_SIZE} elements")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # jinja's names: a call may pass a kwarg "self"
        _tick()
        return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)


class _Range:
    """The sandbox's range, checking the time budget as it is iterated (nested loops multiply)."""

    def __init__(self, *args):
        self.values = safe_range(*args)

    def __len__(self):
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i]

    def __iter__(self):
        for i, value in enumerate(self.values):
            if i % 1024 == 0:
                _tick()
            yield value


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["range"] = _Range
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CamelidError(f"chat template: syntax error at line {exc.lineno}: {exc.message}") from None


def resolve_template(name_or_source: str) -> tuple[str, list[str]]:
    """A built-in name gives its template and stop strings, and so does one of FastChat's formats (by its
    FastChat name, or as `fastchat:NAME` where camelid has a built-in of the same name); anything else is taken
    as Jinja source."""
    if name_or_source in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_source]
    fastchat = name_or_source.removeprefix("fastchat:")
    if fastchat in FORMATS or fastchat in ALIASES:
        return fastchat_template(fastchat)
    if "{" not in name_or_source:
        raise CamelidError(f"unknown chat template {name_or_source!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}; "
                           f"FastChat's: {', '.join([*FORMATS, *ALIASES])}")
    return name_or_source, []


def render_chat(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = True,
                **kwargs) -> str:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CamelidError(f"messages[{i}]: each message needs a 'role' and a 'content'")
    source, _ = resolve_template(template)
    # tools: OpenAI-style function definitions, as transformers' apply_chat_template passes them
    context = {"bos_token": "", "eos_token": "", "tools": None, "documents": None, **special_tokens, **kwargs}
    compiled = compile_template(source)
    _deadline.at = time.monotonic() + RENDER_SECONDS
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as exc:
        raise CamelidError(f"chat template: {exc}") from None
    except Exception as exc:  # the template's own code failed (a TypeError, deep recursion...) on this input
        raise CamelidError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _deadline.at = float("inf")
