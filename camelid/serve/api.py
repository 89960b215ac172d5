"""The OpenAI-compatible request bodies: validated, with OpenAI's names, ranges and defaults. Types are
strict, as OpenAI's are: `"0.5"` is not a number and `true` is not 1.

Nothing a client sends is dropped without a word: a field of the OpenAI API this server does not compute yet
(logit_bias, audio, ...) is refused with a 400 naming it whenever it asks for something, and a
field the API does not define is refused unless the request opts in (app.py: `X-Camelid-Unknown-Fields:
ignore`). Fields that do not change the output (`user`, `metadata`, `service_tier`) are accepted."""

from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from camelid.generate.constrained import check_json_schema
from camelid.generate.sampling import INT64, MIN_TEMPERATURE

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API and vLLM allow

# OpenAI's (and llama.cpp's) fields this server does not compute yet: their "off" values pass, anything else is a 400
NOT_YET = {"logit_bias": (None, {}), "functions": (None, []), "function_call": (None, "none", "auto"),
           "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
           "web_search_options": (None,), "store": (None, False), "suffix": (None, ""), "best_of": (None, 1)}
# defined by the API, and changing nothing in the output
NO_EFFECT = {"user", "metadata", "service_tier"}


def _refuse_what_is_not_computed(data):
    if isinstance(data, dict):
        for key, off in NOT_YET.items():
            if key in data and data[key] not in off:
                raise ValueError(f"{key}: not supported by this server")
    return data


def _optional_schema(v):
    if v is not None:
        check_json_schema(v)
    return v


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: Union[dict, bool] = Field({"type": "object"}, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the output always follows the schema here; strict asks for nothing more

    @field_validator("schema_")
    @classmethod
    def _json_schema(cls, v):
        check_json_schema(v)
        return v


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: needed with type json_schema, and only then")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = ""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (llama.cpp server)
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    n: int = Field(1, ge=1, le=128)  # choices per prompt, as OpenAI allows
    stream: bool = False
    stream_options: dict | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # llama.cpp's extensions: a GBNF grammar, or a JSON schema, the output follows
    json_schema: Union[dict, bool, None] = None

    _json_schema = field_validator("json_schema")(classmethod(lambda cls, v: _optional_schema(v)))

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [name for name, on in (("response_format", self.response_format and
                                         self.response_format.type != "text"),
                                        ("grammar", self.grammar), ("json_schema", self.json_schema is not None))
                 if on]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one of response_format, grammar and json_schema")
        return self

    _not_yet = model_validator(mode="before")(_refuse_what_is_not_computed)

    def unknown_fields(self) -> list[str]:
        """Fields the request sent that the API does not define (its messages' too)."""
        extra = [k for k in (self.model_extra or {}) if k not in NOT_YET and k not in NO_EFFECT]
        for i, m in enumerate(getattr(self, "messages", None) or []):
            extra += [f"messages.{i}.{k}" for k in (m.model_extra or {})]
        return extra

    @field_validator("temperature")
    @classmethod
    def _representable(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:.3g}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        return stops



class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    _json_schema = field_validator("parameters")(classmethod(lambda cls, v: _optional_schema(v)))


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: dict

    @field_validator("function")
    @classmethod
    def _named(cls, v):
        if set(v) != {"name"} or not isinstance(v["name"], str):
            raise ValueError("function: give the function's name, {\"name\": ...}")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = ""
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, and the tool's answer to one, as
    tool_call_id: str | None = None  # the chat template renders them

    def for_template(self) -> dict:
        """The message as a chat template reads it (transformers' names), with the fields it was sent with; a
        call's arguments as an object, as templates write them with tojson (vLLM does the same)."""
        out = {"role": self.role, "content": self.text()}
        out.update({k: getattr(self, k) for k in ("name", "tool_call_id") if getattr(self, k)})
        if self.tool_calls:
            out["tool_calls"] = [_call_for_template(c) for c in self.tool_calls]
        return out

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, v):
        for i, call in enumerate(v or []):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ValueError(f"{i}: a tool call needs function.name")
            args = function.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    json.loads(args)
                except ValueError:
                    raise ValueError(f"{i}: function.arguments is not JSON") from None
        return v

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        """OpenAI content parts: this server's models read text, so any other part is refused, not dropped."""
        for i, part in enumerate(v if isinstance(v, list) else []):
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"part {i}: content of type {kind!r} is not supported (this model reads text)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


def _call_for_template(call: dict) -> dict:
    function = dict(call["function"])
    if isinstance(function.get("arguments", "{}"), str):
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    return {**call, "function": function}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None  # each reply token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # and this many alternatives
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tools_chosen(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice: needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function["name"] not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function['name']!r}")
        if self.active_tools and (self.response_format and self.response_format.type != "text"
                                  or self.grammar or self.json_schema is not None):
            raise ValueError("tools: a reply that may call a tool cannot also be held to a response format "
                             "(tool_choice: none sends the tools without calls)")
        return self

    @property
    def active_tools(self) -> list[Tool]:
        """The tools the model may call (none with tool_choice none; the named one alone)."""
        if self.tool_choice == "none" or not self.tools:
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function["name"]]
        return list(self.tools)

    @property
    def calls_forced(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or several, each answered by a choice of its own
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo scores the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # log-probabilities and this many alternatives

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _nothing_to_do(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 needs echo: true (the prompt is then all there is to return)")
        if self.stream and len(self.prompts) > 1:
            raise ValueError("prompt: stream one prompt per request")
        return self

    @property
    def prompts(self) -> list:
        """Each prompt: a string or a list of token ids."""
        v = self.prompt
        if isinstance(v, str) or (isinstance(v, list) and isinstance(v[0], int)):
            return [v]
        return list(v)

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    input: Union[str, list[str], list[int], list[list[int]]]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    pooling: Literal["mean", "last", "cls"] = "mean"  # extensions (vLLM's names)
    normalize: bool = True

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("no input to embed")
        return v

    @property
    def inputs(self) -> list:
        v = self.input
        if isinstance(v, str) or isinstance(v[0], int):
            return [v]
        return list(v)

    def unknown_fields(self) -> list[str]:
        return list(self.model_extra or {})


class LoadAdapterRequest(BaseModel):  # vLLM's names
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
