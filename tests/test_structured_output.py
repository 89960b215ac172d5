"""Constrained output (JSON schemas, GBNF grammars) and tool calls: every output under a schema parses and
validates with jsonschema, with random-weight models on both kinds of tokenizer; the server's
response_format, grammar, tools and tool_choice, streaming or not; the tool-call syntaxes of real chat templates
(llama.cpp's copies of Qwen2.5's, Llama 3.1's, Mistral Nemo's and Hermes 3's)."""

import json
import re
import threading

import httpx
import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from camelid.errors import CamelidError
from camelid.formats.load import load_model
from camelid.formats.loaded import LoadedModel
from camelid.generate import constrained
from camelid.generate.generate import generate
from camelid.generate.sampling import SamplingParams
from camelid.model.config import ModelConfig
from camelid.model.transformer import Transformer
from camelid.serve import tool_calls
from camelid.tokenizer import tool_turns
from camelid.tokenizer.tokenizer import HFBackend, Tokenizer

import test_serve
from conftest import REPO, SHARED
from test_serve import post, running_server, wait_ready

MODEL = REPO / "models" / "stories260K"
server = test_serve.server  # the serve tests' fixture: one server for the module
TEMPLATES = REPO / ".cache" / "llama.cpp" / "models" / "templates"
GPT2 = SHARED / "tokenizers" / "gpt2_tokenizer.json"

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array-of-enums": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}},
        "required": ["colors"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},  # a bounded number of digits
        "ok": {"type": "boolean"}}, "required": ["age", "score", "ok"], "additionalProperties": False},
    "pattern-and-union": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "value": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]}},
        "required": ["id", "value"], "additionalProperties": False},
    "array-of-objects": {"type": "array", "items": {
        "type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer", "maximum": 99,
                                                                           "minimum": 0}},
        "required": ["k", "v"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
}


@pytest.fixture(scope="module")
def stories():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def gpt2_model():
    """A random-weight model with GPT-2's byte-level BPE tokenizer (Hugging Face tokenizers)."""
    if not GPT2.exists():
        pytest.skip(f"{GPT2} is absent (../shared)")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50304, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=2048)
    tok = Tokenizer(HFBackend(HFTokenizer.from_file(str(GPT2))), eos_ids=[50256], add_bos=False)
    return LoadedModel(Transformer(cfg).eval(), tok)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("which", ["stories", "gpt2_model"])
def test_every_output_under_a_schema_parses_and_validates(request, which, name):
    lm = request.getfixturevalue(which)
    schema = SCHEMAS[name]
    rule = constrained.json_schema(schema, "schema")
    for seed in range(4):
        out = generate(lm, ["Once upon a time"], 400, SamplingParams(temperature=1.0, seed=seed), constraint=rule)[0]
        assert out.finish_reason == "stop", (seed, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_a_gbnf_grammar_holds_the_output(stories):
    rule = constrained.gbnf('root ::= ("yes" | "no") ", " [0-9]{1,3} " " name\nname ::= [a-z]+ "!"', "grammar")
    outs = generate(stories, ["Once", "The cat", "One day"], 60, SamplingParams(temperature=1.0, seed=3),
                    constraint=rule)
    for out in outs:
        assert re.fullmatch(r"(yes|no), [0-9]{1,3} [a-z]+!", out.text), out.text


def test_bad_schemas_and_grammars_are_refused_by_name(stories):
    with pytest.raises(CamelidError, match="schema: .*strin"):
        constrained.check(constrained.json_schema({"type": "strin"}, "schema"), stories.tokenizer)
    with pytest.raises(CamelidError, match="grammar"):
        constrained.check(constrained.gbnf("root ::= (", "grammar"), stories.tokenizer)
    with pytest.raises(CamelidError, match="grammar: the grammar is empty"):
        constrained.gbnf(" ", "grammar")


# ---------------------------------------------------------------- the server


def chat(base, **body):
    return post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me"}],
                                               "max_tokens": 300, "seed": 1, **body})


def test_response_format_json_schema_and_json_object(server):
    base = server[0]
    schema = SCHEMAS["nested"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    r = chat(base, response_format=fmt)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    for seed in range(3):  # any object: a story model may write keys until max_tokens, but only JSON
        r = chat(base, response_format={"type": "json_object"}, max_tokens=120, seed=seed)
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 300, "seed": 1,
                            "response_format": fmt, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == r.json()["choices"][0]["message"]["content"] or jsonschema.validate(json.loads(streamed),
                                                                                            schema) is None


def test_grammar_and_json_schema_on_completions(server):
    base = server[0]
    r = post(base, "/v1/completions", {"prompt": "Once", "max_tokens": 40, "seed": 2,
                                       "grammar": 'root ::= "The " ("cat" | "dog") " is " [0-9]+ "."'})
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"The (cat|dog) is [0-9]+\.", r.json()["choices"][0]["text"])
    schema = SCHEMAS["numbers"]
    r = post(base, "/v1/completions", {"prompt": "Once", "max_tokens": 100, "seed": 2, "json_schema": schema})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


@pytest.mark.parametrize("extra,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema: not a valid JSON schema"),
    ({"response_format": {"type": "json_schema"}}, "json_schema: needed with type json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}, "give one of"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
     "tools.0.function.parameters: not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tool_choice": "required"}, "tool_choice: needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                 "function": {"name": "g"}}},
     "no tool is named 'g'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "cannot also be held to a response format"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "function.arguments is not JSON"),
])
def test_bad_formats_and_tools_are_400s_naming_the_field(server, extra, needle):
    r = chat(server[0], **extra)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_a_bad_grammar_does_not_touch_the_requests_beside_it(server):
    base = server[0]
    results = {}

    def good():
        results["good"] = chat(base, response_format={"type": "json_object"}, max_tokens=200)

    thread = threading.Thread(target=good)
    thread.start()
    bad = post(base, "/v1/completions", {"prompt": "x", "grammar": "root ::= [z-a]"})
    thread.join()
    assert bad.status_code == 400, bad.text
    assert results["good"].status_code == 200
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_server(gpt2_model):
    """The random GPT-2-vocabulary model behind a server: the tools' prompt fits its context."""
    with running_server(lambda: gpt2_model) as (base, app):
        wait_ready(base)
        yield base, app


def _check_calls(message, tools=(WEATHER, TIME)):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_required_and_named_tool_choice_give_calls_that_validate(tool_server):
    base = tool_server[0]  # a template that knows nothing of tools: the generic syntax
    for seed in range(3):
        r = chat(base, tools=[WEATHER, TIME], tool_choice="required", seed=seed, max_tokens=None)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        _check_calls(choice["message"])
    r = chat(base, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
             max_tokens=None)
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    r = chat(base, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=None)
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1
    r = chat(base, tools=[WEATHER], tool_choice="none", max_tokens=5, temperature=0)
    assert r.json()["choices"][0]["finish_reason"] != "tool_calls" and "tool_calls" not in r.json()["choices"][0][
        "message"]


def test_streamed_tool_calls_assemble_to_the_same_calls(tool_server):
    base = tool_server[0]
    body = {"messages": [{"role": "user", "content": "Weather?"}], "temperature": 0, "tools": [WEATHER],
            "tool_choice": "required"}
    whole = post(base, "/v1/chat/completions", body).json()["choices"][0]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    calls = {}
    for c in chunks:
        for delta in c["choices"][0]["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            call["name"] += delta.get("function", {}).get("name", "")
            call["arguments"] += delta.get("function", {}).get("arguments", "")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in whole["message"]["tool_calls"]]
    assert [calls[i] for i in sorted(calls)] == want


def test_the_openai_client_reads_tool_calls(tool_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{tool_server[0]}/v1", api_key="none")
    r = client.chat.completions.create(model="stories", messages=[{"role": "user", "content": "Weather?"}],
                                       tools=[WEATHER], tool_choice="required", seed=4)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in (
        "celsius", "fahrenheit")
    history = [{"role": "user", "content": "Weather?"}, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    again = client.chat.completions.create(model="stories", messages=history, max_tokens=5)
    assert again.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- real templates, their syntaxes


def template(name):
    path = TEMPLATES / name
    if not path.exists():
        pytest.skip(f"{path} is absent (make test unpacks llama.cpp's templates)")
    return path.read_text()


SYNTAXES = {"Qwen-Qwen2.5-7B-Instruct.jinja": "hermes", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
            "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3", "mistralai-Mistral-Nemo-Instruct-2407.jinja":
                "mistral", "google-gemma-2-2b-it.jinja": "generic"}


@pytest.mark.parametrize("name", sorted(SYNTAXES))
def test_each_template_gets_its_syntax_and_renders_tools_and_calls(name, gpt2_model):
    source = template(name)
    syntax = tool_turns.syntax_of(source) if tool_turns.takes_tools(source) else "generic"
    assert syntax == SYNTAXES[name]
    lm = LoadedModel(gpt2_model.model, gpt2_model.tokenizer, template=source)
    with running_server(lambda: lm) as (base, _):
        wait_ready(base)
        r = chat(base, tools=[WEATHER, TIME], tool_choice="required", max_tokens=400, seed=7)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        _check_calls(message)
        # the call and its answer go back into the template, as a client sends them on the next turn
        history = [{"role": "user", "content": "Weather?"}, {k: v for k, v in message.items() if v is not None},
                   {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "21 degrees"}]
        r = post(base, "/v1/chat/completions", {"messages": history, "tools": [WEATHER, TIME], "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_tools_reach_the_template_as_transformers_passes_them(stories):
    from camelid.tokenizer.chat_template import render_chat

    text = render_chat(template("Qwen-Qwen2.5-7B-Instruct.jinja"), [{"role": "user", "content": "Weather?"}], {},
                       tools=[WEATHER])
    assert "<tools>" in text and '"name": "get_weather"' in text


@pytest.mark.parametrize("syntax,text,want", [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": '
               '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
               '</tool_call>', ("Let me look.", ["get_weather", "get_time"])),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
               '{"name": "get_time", "parameters": {"zone": "CET"}}', ("", ["get_weather", "get_time"])),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', ("", ["get_time"])),
    ("mistral", '[{"name": "get_time", "arguments": {"zone": "UTC"}}]', ("", ["get_time"])),  # marker decoded away
    ("generic", '```json\n{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}\n```',
     ("", ["get_time"])),
    ("generic", "It is sunny.", ("It is sunny.", [])),
    ("hermes", '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>', (None, [])),  # not offered
    ("llama3", '{"name": "get_time", "parameters": {"zone": ', (None, [])),  # cut short: content
])
def test_parsers_read_each_syntax(syntax, text, want):
    content, calls = tool_calls.parse(syntax, text, {"get_weather", "get_time"})
    assert [c.name for c in calls] == want[1]
    assert content == (text if want[0] is None else want[0])
    assert all(json.loads(c.arguments) is not None for c in calls)


@pytest.mark.parametrize("syntax", ["hermes", "llama3", "generic"])
def test_call_stream_sends_content_and_holds_back_calls(syntax):
    calls = {"hermes": 'Sure. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
             "llama3": '{"name": "get_time", "parameters": {"zone": "UTC"}}',
             "generic": '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}'}[syntax]
    for text in (calls, "Plain words, no call at all."):
        stream = tool_calls.CallStream(syntax, {"get_time"})
        sent = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
        rest, found = stream.finish()
        whole_content, whole_calls = tool_calls.parse(syntax, text, {"get_time"})
        assert [c.name for c in found] == [c.name for c in whole_calls]
        assert (sent + rest).strip() == whole_content.strip()


@pytest.mark.parametrize("syntax", ["hermes", "llama3", "mistral", "generic"])
def test_forced_calls_follow_parameters_with_their_own_defs(syntax, stories):
    """Pydantic writes nested models as $defs with #/$defs references: they resolve inside the call grammar."""
    params = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
              "additionalProperties": False, "$defs": {
                  "Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                             "unit": {"$ref": "#/$defs/Unit"}},
                            "required": ["city", "unit"], "additionalProperties": False},
                  "Unit": {"enum": ["c", "f"]}}}
    tools = [{"type": "function", "function": {"name": "w", "parameters": params}}, TIME]
    rule = constrained.lark(tool_calls.call_grammar(syntax, tools, parallel=False), "tools")
    for seed in range(3):
        out = generate(stories, ["x"], 300, SamplingParams(temperature=1.0, seed=seed), constraint=rule)[0]
        assert out.finish_reason == "stop", out.text
        _, calls = tool_calls.parse(syntax, out.text, {"w", "get_time"})
        assert len(calls) == 1, out.text
        schema = params if calls[0].name == "w" else TIME["function"]["parameters"]
        jsonschema.validate(json.loads(calls[0].arguments), schema)
