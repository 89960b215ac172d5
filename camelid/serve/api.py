"""The OpenAI-compatible request bodies: validated, with OpenAI's names, ranges and defaults. Types are
strict, as OpenAI's are: `"0.5"` is not a number and `true` is not 1."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from camelid.generate.sampling import INT64, MIN_TEMPERATURE

MAX_STOP_STRINGS = 4


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

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
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None
    logprobs: Union[bool, int, None] = None

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

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = ""

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


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (n=1)")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v
