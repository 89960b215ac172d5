"""FastChat's conversation formats (fschat 0.2.36's `conversation.py`), as data turned into Jinja templates, and
the model names FastChat's model adapters match them by.

The seed-era chat models (Vicuna, Koala, Dolly, OpenAssistant's Pythia, Baize, StableLM, MPT-chat, Falcon,
ChatGLM, FastChat-T5) shipped no chat template: they were prompted the way FastChat's `Conversation.get_prompt`
lays a conversation out, one separator style per family. Each format here is that layout as a Jinja template
(so it renders, masks and exports like any other template), equal to FastChat's text for the same messages.
Where FastChat writes the literal `</s>` or `<s>` of a LLaMA tokenizer, the template writes `eos_token` /
`bos_token`, and a format whose tokenizer adds a BOS (or ChatGLM's prefix tokens) begins with it, as camelid
renders a prompt whole and encodes it without adding any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_ONE_SHOT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_ONE_SHOT = (
    ("Human", "Got any creative ideas for a 10 year old’s birthday?"),
    ("Assistant", """Of course! Here are some creative ideas for a 10-year-old's birthday party:
1. Treasure Hunt: Organize a treasure hunt in your backyard or nearby park. Create clues and riddles for the kids to solve, leading them to hidden treasures and surprises.
2. Science Party: Plan a science-themed party where kids can engage in fun and interactive experiments. You can set up different stations with activities like making slime, erupting volcanoes, or creating simple chemical reactions.
3. Outdoor Movie Night: Set up a backyard movie night with a projector and a large screen or white sheet. Create a cozy seating area with blankets and pillows, and serve popcorn and snacks while the kids enjoy a favorite movie under the stars.
4. DIY Crafts Party: Arrange a craft party where kids can unleash their creativity. Provide a variety of craft supplies like beads, paints, and fabrics, and let them create their own unique masterpieces to take home as party favors.
5. Sports Olympics: Host a mini Olympics event with various sports and games. Set up different stations for activities like sack races, relay races, basketball shooting, and obstacle courses. Give out medals or certificates to the participants.
6. Cooking Party: Have a cooking-themed party where the kids can prepare their own mini pizzas, cupcakes, or cookies. Provide toppings, frosting, and decorating supplies, and let them get hands-on in the kitchen.
7. Superhero Training Camp: Create a superhero-themed party where the kids can engage in fun training activities. Set up an obstacle course, have them design their own superhero capes or masks, and organize superhero-themed games and challenges.
8. Outdoor Adventure: Plan an outdoor adventure party at a local park or nature reserve. Arrange activities like hiking, nature scavenger hunts, or a picnic with games. Encourage exploration and appreciation for the outdoors.
Remember to tailor the activities to the birthday child's interests and preferences. Have a great celebration!"""),  # noqa: E501
)
_BAIZE_SYSTEM = (
    "The following is a conversation between a human and an AI assistant named Baize (named after a mythical "
    "creature in Chinese folklore). Baize is an open-source AI assistant developed by UCSD and Sun Yat-Sen "
    "University. The human and the AI assistant take turns chatting. Human statements start with [|Human|] and AI "
    "assistant statements start with [|AI|]. The AI assistant always provides responses in as much detail as "
    "possible, and in Markdown format. The AI assistant always declines to engage with topics, questions and "
    "instructions related to unethical, controversial, or sensitive issues. Complete the transcript in exactly "
    "that format.\n")
_STABLELM_SYSTEM = """# StableLM Tuned (Alpha version)
- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.
- StableLM is excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- StableLM is more than just an information source, StableLM is also able to write poetry, short stories, and make jokes.
- StableLM will refuse to participate in anything that could harm a human.
"""  # noqa: E501
_MPT_SYSTEM = """- You are a helpful assistant chatbot trained by MosaicML.
- You answer questions.
- You are excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- You are more than just an information source, you are also able to write poetry, short stories, and make jokes."""  # noqa: E501
_ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")


@dataclass(frozen=True)
class Format:
    """One of FastChat's conversation formats: its `Conversation` fields, and what camelid adds (the text a
    prompt begins with, which FastChat's tokenizer call added, and the stop strings for its stop token ids)."""
    style: str  # FastChat's SeparatorStyle
    roles: tuple[str, str]
    system: str = ""
    system_template: str = "{system_message}"
    sep: str = "\n"
    sep2: str | None = None
    shots: tuple[tuple[str, str], ...] = ()  # the few-shot turns every conversation begins with
    begin: str = ""  # Jinja: "{{ bos_token }}" where the tokenizer adds a BOS
    stop: tuple[str, ...] = field(default=())


_BOS = "{{ bos_token }}"
FORMATS: dict[str, Format] = {
    "vicuna_v1.1": Format("ADD_COLON_TWO", ("USER", "ASSISTANT"), _VICUNA_SYSTEM, sep=" ", sep2="</s>", begin=_BOS),
    "one_shot": Format("ADD_COLON_SINGLE", ("Human", "Assistant"), _ONE_SHOT_SYSTEM, sep="\n### ", shots=_ONE_SHOT,
                       begin=_BOS, stop=("###",)),
    "zero_shot": Format("ADD_COLON_SINGLE", ("Human", "Assistant"), _ONE_SHOT_SYSTEM, sep="\n### ", begin=_BOS,
                        stop=("###",)),
    "koala_v1": Format("ADD_COLON_TWO", ("USER", "GPT"), "BEGINNING OF CONVERSATION:", sep=" ", sep2="</s>",
                       begin=_BOS),
    "alpaca": Format("ADD_COLON_TWO", ("### Instruction", "### Response"), _ALPACA_SYSTEM, sep="\n\n", sep2="</s>",
                     begin=_BOS),
    "dolly_v2": Format("DOLLY", ("### Instruction", "### Response"), _ALPACA_SYSTEM + "\n\n", sep="\n\n",
                       sep2="### End", stop=("### End",)),
    "oasst_pythia": Format("NO_COLON_SINGLE", ("<|prompter|>", "<|assistant|>"), sep="<|endoftext|>"),
    "baize": Format("NO_COLON_SINGLE", ("[|Human|]", "[|AI|]"), _BAIZE_SYSTEM, sep="\n",
                    shots=(("[|Human|]", "Hello!"), ("[|AI|]", "Hi!")), begin=_BOS, stop=("[|Human|]",)),
    "falcon": Format("RWKV", ("User", "Assistant"), sep="\n", sep2="<|endoftext|>", stop=("\nUser",)),
    "mpt-7b-chat": Format("CHATML", ("<|im_start|>user", "<|im_start|>assistant"), _MPT_SYSTEM,
                          "<|im_start|>system\n{system_message}", sep="<|im_end|>", stop=("<|im_end|>",)),
    "stablelm": Format("NO_COLON_SINGLE", ("<|USER|>", "<|ASSISTANT|>"), _STABLELM_SYSTEM,
                       "<|SYSTEM|>{system_message}", sep="", stop=("<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>")),
    "chatglm2": Format("CHATGLM", ("问", "答"), sep="\n\n", begin="[gMASK]sop"),
    "chatglm3": Format("CHATGLM3", ("<|user|>", "<|assistant|>"), system_template="<|system|>\n{system_message}",
                       begin="[gMASK]sop", stop=("<|user|>", "<|observation|>")),
    "llama-2": Format("LLAMA2", ("[INST]", "[/INST]"), system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
                      sep=" ", sep2=" </s><s>", begin=_BOS),
}
# FastChat's names for what it serves with one of the formats above (its model adapters' choices)
ALIASES = {"vicuna_v0": "one_shot", "wizardlm": "vicuna_v1.1", "fastchat-t5": "one_shot"}


def _lit(text: str) -> str:
    """A Jinja string literal, with FastChat's LLaMA special-token text as the template's own tokens."""
    escaped = "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    for piece, name in (("</s>", "eos_token"), ("<s>", "bos_token")):
        escaped = escaped.replace(piece, f"' + {name} + '")
    return escaped


# Each separator style's loop over `turns` ([role, text] pairs; text none for the reply to generate), as
# Conversation.get_prompt writes them (a turn's index counts the shots; Llama 2's tags go by the index).
_STYLES = {
    "ADD_COLON_SINGLE": "{{ system_prompt + SEP }}{% for role, text in turns %}{% if text %}"
                        "{{ role + ': ' + text + SEP }}{% else %}{{ role + ':' }}{% endif %}{% endfor %}",
    "ADD_COLON_TWO": "{{ system_prompt + SEP }}{% for role, text in turns %}{% if text %}"
                     "{{ role + ': ' + text + (SEP if loop.index0 % 2 == 0 else SEP2) }}{% else %}{{ role + ':' }}"
                     "{% endif %}{% endfor %}",
    "NO_COLON_SINGLE": "{{ system_prompt }}{% for role, text in turns %}{% if text %}{{ role + text + SEP }}"
                       "{% else %}{{ role }}{% endif %}{% endfor %}",
    "DOLLY": "{{ system_prompt }}{% for role, text in turns %}{% if text %}"
             "{{ role + ':\\n' + text + (SEP if loop.index0 % 2 == 0 else SEP2) }}"
             "{% if loop.index0 % 2 == 1 %}{{ '\\n\\n' }}{% endif %}{% else %}{{ role + ':\\n' }}{% endif %}"
             "{% endfor %}",
    "RWKV": "{{ system_prompt }}{% for role, text in turns %}{% if text %}"
            "{{ role + ': ' + text.replace('\\r\\n', '\\n').replace('\\n\\n', '\\n') + '\\n\\n' }}"
            "{% else %}{{ role + ':' }}{% endif %}{% endfor %}",
    "CHATML": "{% if system_prompt %}{{ system_prompt + SEP + '\\n' }}{% endif %}{% for role, text in turns %}"
              "{% if text %}{{ role + '\\n' + text + SEP + '\\n' }}{% else %}{{ role + '\\n' }}{% endif %}{% endfor %}",
    "CHATGLM": "{% if system_prompt %}{{ system_prompt + SEP }}{% endif %}{% for role, text in turns %}"
               "{% if loop.index0 % 2 == 0 %}{{ '[Round ' ~ (loop.index0 // 2 + ROUND) ~ ']' + SEP }}{% endif %}"
               "{% if text %}{{ role + '：' + text + SEP }}{% else %}{{ role + '：' }}{% endif %}{% endfor %}",
    "CHATGLM3": "{% if system_message %}{{ system_prompt }}{% endif %}{% for role, text in turns %}"
                "{% if text %}{{ role + '\\n' + text }}{% else %}{{ role }}{% endif %}{% endfor %}",
    "LLAMA2": "{% if system_message %}{{ system_prompt }}{% else %}{{ '[INST] ' }}{% endif %}"
              "{% for _, text in turns %}{% set role = [ROLE0, ROLE1][loop.index0 % 2] %}{% if text %}"
              "{% if loop.index0 == 0 %}{{ text + ' ' }}{% else %}{{ role + ' ' + text + (SEP if loop.index0 % 2 == 0 "
              "else SEP2) }}{% endif %}{% else %}{{ role }}{% endif %}{% endfor %}",
}


def fastchat_template(name: str) -> tuple[str, list[str]]:
    """The Jinja template and stop strings of FastChat's format `name` (or one of ALIASES)."""
    fmt = FORMATS[ALIASES.get(name, name)]
    before, _, after = fmt.system_template.partition("{system_message}")
    shots = "[" + ", ".join(f"[{_lit(r)}, {_lit(t)}]" for r, t in fmt.shots) + "]"
    body = _STYLES[fmt.style]
    for key, value in (("SEP2", _lit(fmt.sep2 or "")), ("SEP", _lit(fmt.sep)),
                       ("ROLE0", _lit(fmt.roles[0])), ("ROLE1", _lit(fmt.roles[1])),
                       ("ROUND", "1" if ALIASES.get(name, name) == "chatglm2" else "0")):
        body = re.sub(rf"\b{key}\b", lambda _, value=value: value, body)
    source = (
        fmt.begin
        + "{% if messages and messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        f"{{% else %}}{{% set system_message = {_lit(fmt.system)} %}}{{% set loop_messages = messages %}}{{% endif %}}"
        f"{{% set system_prompt = {_lit(before)} + system_message + {_lit(after)} %}}"
        f"{{% set ns = namespace(turns={shots}) %}}"
        "{% for message in loop_messages %}"
        "{% if message['role'] not in ('user', 'assistant') %}"
        "{{ raise_exception('this format has user and assistant turns after an optional system message, not '"
        " + message['role']) }}{% endif %}"
        f"{{% set ns.turns = ns.turns + [[{_lit(fmt.roles[0])} if message['role'] == 'user' else "
        f"{_lit(fmt.roles[1])}, message['content']]] %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{% set ns.turns = ns.turns + [[{_lit(fmt.roles[1])}, none]] %}}{{% endif %}}"
        "{% set turns = ns.turns %}"
        + body)
    return source, list(fmt.stop)


def template_for_model(name_or_path: str) -> str | None:
    """The format FastChat's model adapters give a model of this name or path, or None where their choice is
    none of the formats above. As `get_model_adapter`: the path's last part first, then the whole path, each
    against the adapters in FastChat's order, the first that matches deciding. FastChat's last adapter, which
    takes any name (one_shot), is not followed: such a model keeps its family's default."""
    path = name_or_path.rstrip("/\\")
    base = PurePath(path).name
    for candidate in (base, path):
        low = candidate.lower()
        for every, none_of, pick in _ADAPTERS:
            if all(w in low for w in every) and not any(w in low for w in none_of):  # (it picks by the whole path)
                return pick(path.lower(), base) if callable(pick) else pick
    return None


def _vicuna(low: str, base: str) -> str:
    return "one_shot" if "v0" in base else "vicuna_v1.1"


def _chatglm(low: str, base: str) -> str | None:
    return "chatglm2" if "chatglm2" in low else "chatglm3" if "chatglm3" in low else None


def _wizardlm(low: str, base: str) -> str:
    return "vicuna_v1.1" if any(size in low for size in ("13b", "30b", "70b")) else "one_shot"


def _mpt(low: str, base: str) -> str | None:
    if "mpt-7b-chat" in low:
        return "mpt-7b-chat"
    return None if "mpt-30b-chat" in low or "mpt-30b-instruct" in low else "zero_shot"


# fschat 0.2.36's adapters up to Llama2Adapter, in its order: (all of these in the lowercased name, none of
# these, its format, or a function of (the lowercased name, the path's last part) choosing it). An adapter
# whose format is not above still matches, and ends the search with None.
_ADAPTERS: list[tuple] = [
    (("peft",), (), None), (("stable-vicuna",), (), None), (("vicuna",), (), _vicuna), (("airoboros",), (), None),
    (("spicyboros",), (), None), (("longchat",), (), "vicuna_v1.1"), (("flan-",), (), "one_shot"),
    (("fastchat-t5",), (), "one_shot"), (("codet5p",), (), "one_shot"), (("koala",), (), "koala_v1"),
    (("alpaca",), (), "alpaca"), (("chatglm",), (), _chatglm), (("codegeex",), (), None),
    (("dolly-v2",), (), "dolly_v2"), (("oasst", "pythia"), (), "oasst_pythia"), (("oasst",), (), None),
    (("openchat", "3.5"), (), None), (("starling-lm",), (), None), (("tenyxchat",), (), None),
    (("stablelm",), (), "stablelm"), (("baize",), (), "baize"), (("rwkv-4",), (), None), (("openbuddy",), (), None),
    (("phoenix",), (), None), (("gemini",), (), None), (("bard",), (), None), (("mpt",), ("airoboros",), _mpt),
    (("billa",), (), None), (("redpajama-incite",), (), None), (("h2ogpt",), (), None), (("robin",), (), None),
    (("gpt4all", "snoozy"), (), None), (("wizardlm",), (), _wizardlm), (("manticore",), (), None),
    (("guanaco",), (), "zero_shot"), (("camel",), (), "vicuna_v1.1"), (("polyglot", "chang"), (), None),
    (("tulu",), (), None), (("falcon", "chat"), (), None), (("falcon",), (), "falcon"), (("tigerbot",), (), None),
    (("baichuan",), (), lambda low, base: None if "chat" in low else "zero_shot"), (("xgen",), (), None),
    (("pythia",), (), "one_shot"), (("internlm",), (), None), (("starchat",), (), None),
    (("llama-2",), (), "llama-2"),
]
