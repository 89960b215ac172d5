"""Judges: anything that answers (system prompt, user prompt) -> text. An OpenAI-compatible chat endpoint
(OpenAI, `camelid serve`, vLLM, llama.cpp's server) or a local camelid model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable

from camelid.errors import CamelidError

Ask = Callable[[str, str], str]
API_ERROR = "$ERROR$"  # FastChat's judgment text when the API gave none; it parses as an error


def endpoint_judge(url: str, model: str, api_key: str | None = None, max_tokens: int = 2048,
                   timeout: float = 600, retries: int = 3) -> Ask:
    """FastChat's judge call: temperature 0, max_tokens 2048, the system prompt as a system message. A request
    the server rejects as invalid (say, too long for its context) becomes an error judgment; a server that
    cannot be reached or refuses us ends the run (it resumes from what was judged)."""
    base = url.rstrip("/")
    target = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def ask(system: str, user: str) -> str:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        for attempt in range(retries):
            try:
                with urllib.request.urlopen(urllib.request.Request(target, body, headers), timeout=timeout) as r:
                    return json.loads(r.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                if exc.code in (400, 413, 422):  # this request cannot be judged (e.g. too long): an error row
                    return f"{API_ERROR} HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}"
                if exc.code not in (429, 500, 502, 503) or attempt == retries - 1:
                    raise CamelidError(f"{target}: HTTP {exc.code} "
                                       f"{exc.read()[:200].decode(errors='replace')}") from None
            except (urllib.error.URLError, OSError) as exc:
                if attempt == retries - 1:
                    raise CamelidError(f"{target}: cannot connect ({getattr(exc, 'reason', exc)})") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise CamelidError(f"{target}: not an OpenAI-style chat completions response") from None
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")
    return ask


def local_judge(lm, template: str | None = None, max_tokens: int = 2048) -> Ask:
    """Greedy decoding with the model's chat template. A template without a system role gets the system
    prompt folded into the user turn, as FastChat does for judges that take none."""
    from camelid.generate.generate import generate
    from camelid.generate.sampling import SamplingParams
    from camelid.tokenizer.chat_template import render_chat, resolve_template

    template = template or lm.template
    _, stops = resolve_template(template)
    special = lm.tokenizer.special_tokens_map

    def ask(system: str, user: str) -> str:
        try:
            text = render_chat(template, [{"role": "system", "content": system}, {"role": "user", "content": user}],
                               special)
        except CamelidError:
            text = render_chat(template, [{"role": "user", "content": f"[Instruction]\n{system}\n\n{user}"}], special)
        ids = lm.tokenizer.encode(text, bos=False)
        if len(ids) >= lm.config.max_seq_len:
            return ""  # parsed as a failed judgment, counted as an error
        return generate(lm, [ids], max_tokens, SamplingParams.greedy(), stops)[0].text
    return ask
