"""`camelid serve`: an OpenAI-compatible HTTP API over the continuous-batching engine, and a chat page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from camelid.errors import CamelidError, ModelError
from camelid.formats.loaded import LoadedModel
from camelid.generate import constrained
from camelid.generate.constrained import Constraint
from camelid.generate.embed import embed
from camelid.generate.sampling import SamplingParams
from camelid.model.lora import adapter_rows
from camelid.serve import tool_calls
from camelid.serve.api import ChatRequest, CompletionRequest, EmbeddingRequest, LoadAdapterRequest, UnloadAdapterRequest
from camelid.serve.engine import Engine, EngineStopped, KVBudget, QueueFull, Request
from camelid.serve.models import AdapterBusy, ModelPool, ModelsBusy, Served, UnknownModel
from camelid.serve.seq2seq_engine import Seq2SeqEngine
from camelid.tokenizer.chat_template import resolve_template
from camelid.tokenizer.tool_turns import render_first, syntax_of, takes_tools, tool_chat

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_batch: int = 8  # --parallel: requests decoded together
    max_queue: int = 64
    ctx_size: int | None = None  # one request's most tokens (None: the model's context)
    kv: KVBudget = field(default_factory=KVBudget)
    prefill_chunk: int = 256
    prefix_cache: bool = True
    lookup: object = None  # a speculative.PromptLookup: requests draft and verify several tokens a pass
    draft_tokens: int = 4
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20
    max_models: int = 0  # models loaded at once (0: all of them); the least recently used idle one is unloaded
    max_model_bytes: int = 0  # or past this many bytes of weights and KV caches (0: no limit)
    allow_adapter_loading: bool = False  # /v1/load_lora_adapter: requests may load adapters from this machine
    # Host header values answered (DNS rebinding: a web page must not reach a local server by a name it
    # controls); "*" answers any. Ports are not compared.
    allowed_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error_body(status, message, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


class BodyLimit:
    """Reads the request body up to a size limit before the app sees it: a larger one (declared, or chunked
    and found while reading) is answered 413. The app then gets the buffered body, and later `receive()`
    calls reach the client's connection again (so a disconnect is still seen)."""

    def __init__(self, app, limit: int = 1 << 20):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body"):
                break
        buffered = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        response = _error_body(413, f"request body is larger than {self.limit} bytes", code="body_too_large")
        await response(scope, receive, send)


class HostCheck:
    """Answers only requests whose Host header names an allowed host."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, {h.lower().strip("[]") for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                response = _error_body(400, f"Host {host!r} is not served here (camelid serve --allowed-host)",
                                       "host", "invalid_host")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(load: Callable[[], LoadedModel] | list[Served], config: ServerConfig) -> FastAPI:
    """The app serves one model (`load`, named config.model_name) or several (a list of Served; the first is
    the default). The first loads in the background, /health answering 503 until it is ready; the others load
    on their first request."""
    served = load if isinstance(load, list) else [Served(config.model_name, load)]
    pool = ModelPool(served, lambda lm, draft: (Seq2SeqEngine if lm.config.n_encoder_layers else Engine)(
                         lm, config.max_batch, config.max_queue, config.kv, config.ctx_size, config.prefill_chunk,
                         config.prefix_cache, config.lookup, config.draft_tokens, draft),
                     config.max_models, config.max_model_bytes)
    state = {"engine": None, "error": None, "started": int(time.time()), "loaded": threading.Event(),
             "pool": pool}

    def _load():
        try:
            first, state["engine"], _ = pool.checkout(pool.default)
            pool.checkin(first)
        except BaseException as exc:  # reported by /health, never a crash; `camelid serve` then exits
            state["error"] = pool.models[pool.default].error or str(exc) or type(exc).__name__
        finally:
            state["loaded"].set()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=_load, name="camelid-load", daemon=True).start()
        yield
        pool.shutdown()

    app = FastAPI(title="camelid", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.camelid = state  # the engine, for tests and embedding applications
    app.state.config = config
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(HostCheck, allowed=config.allowed_hosts)  # added last, so it runs first: CORS preflights too
    for kind, handler in ((APIError, _api_error), (RequestValidationError, _invalid), (CamelidError, _camelid_error),
                          (StarletteHTTPException, _http_error), (Exception, _unexpected)):
        app.add_exception_handler(kind, handler)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", page, methods=["GET"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's vendored libraries
    api = dict(dependencies=[Depends(authorize)])
    app.add_api_route("/v1/models", models, methods=["GET"], **api)
    app.add_api_route("/metrics", metrics, methods=["GET"], **api)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], **api)
    app.add_api_route("/v1/completions", completions, methods=["POST"], **api)
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"], **api)
    app.add_api_route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"], **api)
    app.add_api_route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"], **api)
    return app


# ---------------------------------------------------------------- errors


async def _api_error(_, exc: APIError):
    return _error_body(exc.status, exc.message, exc.param, exc.code, exc.kind)


async def _invalid(_, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", []) if p != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return _error_body(400, "the request body is not valid JSON", None, "invalid_json")
    message = err.get("msg", "invalid request").removeprefix("Value error, ")
    return _error_body(400, f"{param}: {message}" if param else message, param, "invalid_parameter")


async def _camelid_error(request, exc: CamelidError):  # the request's own input: its text, its parameters
    return await _api_error(request, _generation_error(exc))


async def _unexpected(_, exc: Exception):
    return _error_body(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


async def _http_error(_, exc: StarletteHTTPException):
    return _error_body(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)


# ---------------------------------------------------------------- routes


def authorize(request: HTTPRequest):
    key = request.app.state.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                       kind="authentication_error")


@dataclass
class Using:
    """The model a request runs on: its engine, the adapter its rows apply (0: none), the name it asked for."""
    engine: Engine
    adapter: int
    name: str


@contextlib.asynccontextmanager
async def _model_for(http: HTTPRequest, name: str):
    """The engine of the model a request names ("" or absent: the first), loaded first if it must be, and kept
    from being unloaded until the request is in its engine."""
    state = http.app.state.camelid
    pool: ModelPool = state["pool"]
    try:
        served, adapter = pool.resolve(name)
    except UnknownModel:
        listed = ", ".join(repr(n) for n, _ in pool.names())
        raise APIError(404, f"the model {name!r} does not exist; this server serves {listed}", "model",
                       "model_not_found") from None
    if served.name == pool.default and state["engine"] is None:
        raise APIError(503, "the model is still loading" if state["error"] is None
                       else f"the model failed to load: {state['error']}", code="model_not_ready",
                       kind="server_error")
    try:
        served, eng, adapter = await asyncio.to_thread(pool.checkout, name)
    except ModelsBusy as exc:
        raise APIError(503, str(exc), "model", "models_busy", kind="server_error") from None
    except CamelidError as exc:
        raise APIError(503, str(exc), "model", "model_not_ready", kind="server_error") from None
    try:
        if not eng.alive:
            raise APIError(503, eng.failure or "the generation engine has stopped", code="engine_stopped",
                           kind="server_error")
        yield Using(eng, adapter, name or pool.default)
    finally:
        pool.checkin(served)


async def health(request: HTTPRequest):
    state = request.app.state.camelid
    eng = state["engine"]
    if eng is not None and eng.alive:
        return {"status": "ok"}
    error = state["error"] or (eng.failure or "the generation engine has stopped" if eng else None)
    return JSONResponse({"status": "error" if error else "loading", "error": error}, status_code=503)


async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


async def models(request: HTTPRequest):
    state = request.app.state.camelid
    pool: ModelPool = state["pool"]
    data = []
    for name, parent in pool.names():
        served = pool.models[parent or name]
        data.append({"id": name, "object": "model", "created": state["started"], "owned_by": "camelid",
                     "parent": parent, "loaded": served.engine is not None})
    return {"object": "list", "data": data}


async def metrics(request: HTTPRequest):
    return PlainTextResponse(prometheus_text(request.app.state.camelid["engine"]),
                             media_type="text/plain; version=0.0.4")


UNKNOWN_FIELDS_HEADER = "X-Camelid-Unknown-Fields"


def _check_fields(body, http: HTTPRequest):
    """A field the OpenAI API does not define is refused by name, unless the request asks for it to be ignored."""
    unknown = body.unknown_fields()
    if unknown and http.headers.get(UNKNOWN_FIELDS_HEADER, "").lower() != "ignore":
        raise APIError(400, f"{unknown[0]}: not a field of the OpenAI API (send {UNKNOWN_FIELDS_HEADER}: ignore "
                            f"to have unknown fields ignored)", unknown[0], "invalid_parameter")


async def chat_completions(body: ChatRequest, http: HTTPRequest):
    _check_fields(body, http)
    async with _model_for(http, body.model) as use:
        return await _chat(body, http, use)


async def _chat(body: ChatRequest, http: HTTPRequest, use: Using):
    eng = use.engine
    lm = eng.lm
    template, template_stops = resolve_template(lm.template)
    messages = [m.for_template() for m in body.messages]
    tools = _tool_context(body, template)
    candidates = tool_chat(template, messages, tools.offered if tools else None)

    def chat_prompt():  # in a worker thread: a long prompt or a slow template must not stall the loop
        return lm.tokenizer.encode(render_first(template, candidates, lm.tokenizer.special_tokens_map), bos=False)

    try:
        prompt = await asyncio.to_thread(chat_prompt)
    except CamelidError as exc:
        raise APIError(400, str(exc), "messages", "invalid_messages") from None
    constraint = _constraint(body) if tools is None or not body.calls_forced else tools.forced(lm.tokenizer)
    await _check_constraint(constraint, lm.tokenizer)
    limit = body.max_completion_tokens or body.max_tokens
    return await _respond(use, http, body, [prompt], limit, template_stops + lm.stop, chat=True,
                          constraint=constraint, tools=tools)


@dataclass
class _Tools:
    """The tools a chat request lets the model call, and the syntax its template teaches for calls."""
    syntax: str
    offered: list[dict]
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.offered}

    def forced(self, tok) -> Constraint:
        marker = tok.token_id(tool_calls.MISTRAL_MARKER) if self.syntax == "mistral" else None
        return constrained.lark(tool_calls.call_grammar(self.syntax, self.offered, self.parallel, marker), "tools")


def _tool_context(body: ChatRequest, template: str) -> _Tools | None:
    active = body.active_tools
    if not active:
        return None
    syntax = syntax_of(template) if takes_tools(template) else "generic"
    return _Tools(syntax, [t.for_template() for t in active], body.parallel_tool_calls is not False)


def _constraint(body) -> Constraint | None:
    """What the request holds the output to: response_format, or llama.cpp's grammar or json_schema."""
    fmt = body.response_format
    try:
        if fmt is not None and fmt.type == "json_object":
            return constrained.json_object("response_format")
        if fmt is not None and fmt.type == "json_schema":
            return constrained.json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
        if body.grammar:
            return constrained.gbnf(body.grammar, "grammar")
        if body.json_schema is not None:
            return constrained.json_schema(body.json_schema, "json_schema")
    except CamelidError as exc:
        raise APIError(400, str(exc), str(exc).split(":")[0], "invalid_parameter") from None
    return None


async def _check_constraint(constraint: Constraint | None, tok):
    """A grammar or schema the library cannot compile is the request's 400, before it is queued."""
    if constraint is None:
        return
    try:
        await asyncio.to_thread(constrained.check, constraint, tok)
    except CamelidError as exc:
        raise APIError(400, str(exc), constraint.what, "invalid_parameter") from None


async def completions(body: CompletionRequest, http: HTTPRequest):
    _check_fields(body, http)
    async with _model_for(http, body.model) as use:
        return await _complete(body, http, use)


async def _complete(body: CompletionRequest, http: HTTPRequest, use: Using):
    eng = use.engine
    prompts = []
    for i, one in enumerate(body.prompts):
        where = "prompt" if len(body.prompts) == 1 else f"prompt.{i}"
        if isinstance(one, list):
            if not one or any(not 0 <= t < eng.lm.tokenizer.vocab_size for t in one):
                raise APIError(400, f"{where}: " + ("token id out of the vocabulary" if one else "the prompt is empty"),
                               where, "invalid_parameter")
            prompts.append(list(one))
        else:
            try:
                prompts.append(await asyncio.to_thread(eng.lm.tokenizer.encode, one))
            except CamelidError as exc:
                raise APIError(400, f"{where}: {exc}", where, "invalid_parameter") from None
    constraint = _constraint(body)
    await _check_constraint(constraint, eng.lm.tokenizer)
    return await _respond(use, http, body, prompts, body.max_tokens, list(eng.lm.stop), chat=False,
                          constraint=constraint)


def _adapter_loading(http: HTTPRequest) -> ModelPool:
    if not http.app.state.config.allow_adapter_loading:
        raise APIError(403, "adapters are loaded at start-up here (camelid serve --allow-adapter-loading lets "
                            "requests load them)", code="adapter_loading_disabled", kind="permission_error")
    state = http.app.state.camelid
    if state["engine"] is None:
        raise APIError(503, "the model is still loading", code="model_not_ready", kind="server_error")
    return state["pool"]


async def load_lora_adapter(body: LoadAdapterRequest, http: HTTPRequest):
    """vLLM's runtime adapter loading: a PEFT adapter of the first model, served from now on as `lora_name`."""
    pool = _adapter_loading(http)
    if not Path(body.lora_path).is_dir():
        raise APIError(400, f"lora_path: {body.lora_path}: no such adapter folder", "lora_path", "invalid_parameter")
    try:
        await asyncio.to_thread(pool.add_adapter, body.lora_name, body.lora_path)
    except CamelidError as exc:
        param = "lora_name" if str(exc).startswith("lora_name") else "lora_path"
        raise APIError(400, str(exc), param, "invalid_parameter") from None
    return {"object": "model", "id": body.lora_name, "parent": pool.default}


async def unload_lora_adapter(body: UnloadAdapterRequest, http: HTTPRequest):
    pool = _adapter_loading(http)
    try:
        await asyncio.to_thread(pool.remove_adapter, body.lora_name)
    except UnknownModel:
        raise APIError(404, f"lora_name: no adapter {body.lora_name!r} is served", "lora_name",
                       "model_not_found") from None
    except AdapterBusy as exc:
        raise APIError(409, str(exc), "lora_name", "adapter_busy") from None
    return {"object": "model", "id": body.lora_name, "deleted": True}


async def embeddings(body: EmbeddingRequest, http: HTTPRequest):
    _check_fields(body, http)
    async with _model_for(http, body.model) as use:
        return await _embeddings(body, use)


async def _embeddings(body: EmbeddingRequest, use: Using):
    """Pooled final hidden states. They run beside the engine's decode steps, under a lock of their own: the
    model's weights are only read, and an embedding batch needs no KV cache (a served adapter applies)."""
    eng = use.engine
    if eng.lm.config.n_encoder_layers:
        raise APIError(400, f"model: {use.name!r} is an encoder-decoder (T5); embeddings come from decoder-only "
                            "models", "model", "invalid_parameter")
    if body.dimensions is not None and body.dimensions != eng.lm.config.dim:
        raise APIError(400, f"dimensions: this model's embeddings have {eng.lm.config.dim}", "dimensions",
                       "invalid_parameter")
    tok, ctx = eng.lm.tokenizer, eng.lm.config.max_seq_len
    several = isinstance(body.input, list) and not isinstance(body.input[0], int)
    inputs = []
    for i, one in enumerate(body.inputs):
        where = f"input.{i}" if several else "input"
        try:
            ids = list(one) if isinstance(one, list) else await asyncio.to_thread(tok.encode, one)
        except CamelidError as exc:
            raise APIError(400, f"{where}: {exc}", where, "invalid_parameter") from None
        problem = ("the text is empty" if one == "" else "the text has no tokens" if not ids else
                   "token id out of the vocabulary" if any(not 0 <= t < tok.vocab_size for t in ids) else
                   f"{len(ids)} tokens, more than the model's context of {ctx}" if len(ids) > ctx else None)
        if problem:
            raise APIError(400, f"{where}: {problem}", where, "invalid_parameter")
        inputs.append(ids)
    vectors = await asyncio.to_thread(_embed_locked, eng, inputs, body.pooling, body.normalize, use.adapter)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
             if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
    n = sum(map(len, inputs))
    return {"object": "list", "data": data, "model": use.name,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


_EMBED_LOCK = threading.Lock()


def _embed_locked(eng: Engine, inputs, pooling, normalize, adapter: int):
    rows = adapter_rows([adapter] * len(inputs)) if eng.adapters else contextlib.nullcontext()
    with _EMBED_LOCK, torch.inference_mode(), rows:
        return embed(eng.model, inputs, pooling, normalize).cpu()


async def _respond(use: Using, http: HTTPRequest, body, prompts: list[list[int]], max_tokens, stops, chat: bool,
                   constraint: Constraint | None = None, tools: _Tools | None = None):
    config: ServerConfig = http.app.state.config
    eng = use.engine
    if max_tokens is not None and max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens: at most {config.max_tokens_limit}", "max_tokens", "invalid_parameter")
    if body.n > eng.max_batch:
        raise APIError(400, f"n: at most {eng.max_batch} (the server's --parallel)", "n", "invalid_parameter")
    # each prompt's n choices: prefilled once (the first carries the others as copies), seeds seed, seed+1, ...
    requests, leaders = [], []
    for prompt in prompts:
        group = [_request(eng, body, prompt, max_tokens, stops, chat, config, choice) for choice in range(body.n)]
        group[0].copies = group[1:]
        requests += group
        leaders.append(group[0])
    for req in requests:
        req.constraint, req.adapter = constraint, use.adapter
    loop = asyncio.get_running_loop()
    queues = [asyncio.Queue() for _ in requests]
    for i, (req, events) in enumerate(zip(requests, queues)):
        if body.stream:  # one stream for every choice: each event says whose it is
            events = queues[0]
        req.emit = lambda kind, value, events=events, i=i: loop.call_soon_threadsafe(
            events.put_nowait, (i, kind, value) if body.stream else (kind, value))
    submitted = []
    try:
        for req in leaders:
            eng.submit(req)
            submitted += [req] + req.copies
    except QueueFull:
        for req in submitted:
            req.cancel()
        raise APIError(429, "the server is busy: too many queued requests", code="queue_full",
                       kind="rate_limit_error") from None
    except EngineStopped as exc:
        raise APIError(503, str(exc), code="engine_stopped", kind="server_error") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    meta = dict(id=rid, created=int(time.time()), model=use.name)
    first = queues[0].get() if body.stream else asyncio.gather(*(_collect(q) for q in queues))
    try:  # the first event, or for a non-streaming request the whole reply, unless the client leaves
        replies = await _unless_gone(first, http)
    except BaseException:
        for req in requests:
            req.cancel()
        raise
    if replies is None:
        for req in requests:
            req.cancel()
        return JSONResponse({}, status_code=499)
    if body.stream:
        if replies[1] == "error":  # failed before its first token: the status code can still say so
            for req in requests:
                req.cancel()
            raise _generation_error(replies[2])
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        echo = _echo(eng, body, body.prompts[0]) if not chat else ""
        return StreamingResponse(_sse(eng, requests, queues[0], meta, chat, include_usage, replies, echo, tools,
                                      shared_prompt=body.n > 1),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    usage = {k: sum(_usage(req)[k] for req in requests) for k in ("prompt_tokens", "completion_tokens",
                                                                  "total_tokens")}
    tok = eng.lm.tokenizer
    if chat:
        choices = [_chat_choice(i, tok, req, reply, body, tools) for i, (req, reply) in
                   enumerate(zip(requests, replies))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _shared_prompt(usage, body)}
    choices = []
    sent_prompts = [p for p in body.prompts for _ in range(body.n)]
    for i, (req, reply, sent) in enumerate(zip(requests, replies, sent_prompts)):
        echo = _echo(eng, body, sent)
        logprobs = _completion_logprobs(tok, req.prompt, reply, echo) if body.logprobs is not None else None
        choices.append({"index": i, "text": echo + reply.text, "logprobs": logprobs,
                        "finish_reason": req.finish_reason})
    return {**meta, "object": "text_completion", "choices": choices, "usage": _shared_prompt(usage, body)}


def _shared_prompt(usage: dict, body) -> dict:
    """A prompt prefilled once for its n choices counts once, as OpenAI counts it."""
    if body.n == 1:
        return usage
    prompt = usage["prompt_tokens"] // body.n
    return {"prompt_tokens": prompt, "completion_tokens": usage["completion_tokens"],
            "total_tokens": prompt + usage["completion_tokens"]}


def _chat_choice(index: int, tok, req: Request, reply: "Reply", body, tools: _Tools | None) -> dict:
    logprobs = _chat_logprobs(tok, req.prompt, reply.tokens) if body.logprobs else None
    message, finish = {"role": "assistant", "content": reply.text}, req.finish_reason
    content, calls = tool_calls.parse(tools.syntax, reply.text, tools.names) if tools else (reply.text, [])
    if calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": [c.as_openai() for c in calls]}
        finish = "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def _request(eng: Engine, body, prompt: list[int], max_tokens, stops, chat: bool, config: ServerConfig,
             choice: int = 0) -> Request:
    ctx = eng.ctx
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt", "invalid_parameter")
    # without max_tokens a reply may fill the context, or what the KV cache could hold for this request alone
    room = min(ctx, eng.pool.n_blocks * eng.pool.block_size) - len(prompt)
    requested = max_tokens if max_tokens is not None else max(0, min(room, config.max_tokens_limit))
    problem = eng.fits(len(prompt), requested)
    if problem:
        raise APIError(400, problem, "messages" if chat else "prompt", "context_length_exceeded")
    scored = bool(getattr(body, "echo", False)) and body.logprobs_wanted is not None
    if scored and eng.lm.config.n_encoder_layers:
        raise APIError(400, "echo: an encoder-decoder model (T5) reads the prompt with its encoder, which gives "
                            "its tokens no log-probabilities to echo", "echo", "invalid_parameter")
    params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
                            repeat_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty, seed=_choice_seed(body.seed, choice))
    return Request(prompt, params, requested, list(body.stop or []) + stops, emit=lambda kind, value: None,
                   logprobs=body.logprobs_wanted, prompt_logprobs=scored)


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (kept a signed 64-bit integer)."""
    if seed is None or choice == 0:
        return seed
    return (seed + choice + (1 << 63)) % (1 << 64) - (1 << 63)


@dataclass
class Reply:
    text: str = ""
    prompt: list = field(default_factory=list)  # TokenLogprob of the prompt's tokens (echo with logprobs)
    tokens: list = field(default_factory=list)  # TokenLogprob of the generated tokens (logprobs)


async def _collect(events: asyncio.Queue) -> Reply:
    text, reply = [], Reply()
    while True:
        kind, value = await events.get()
        if kind == "text":
            text.append(value)
        elif kind == "token":
            reply.tokens.append(value)
        elif kind == "prompt":
            reply.prompt = value
        elif kind == "error":
            raise _generation_error(value)
        else:
            reply.text = "".join(text)
            return reply


class _Pieces:
    """Each token's text as the whole is decoded, so the pieces add up to the text (a token that ends inside
    a UTF-8 character is "", the next one has the character); an alternative is its token decoded alone."""

    def __init__(self, tok, context=()):
        self.tok, self.decoder = tok, tok.stream(list(context))

    def next(self, token: int) -> str:
        return self.decoder.push(token)

    def alone(self, token: int) -> str:
        return self.tok.decode([token])


def _completion_logprobs(tok, prompt: list[int], reply: Reply, echo: str) -> dict:
    """The legacy completions API's logprobs: tokens, token_logprobs, top_logprobs (a dict of alternatives per
    token; None for the prompt's first) and text_offset, the prompt's tokens first when it is echoed."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pieces = _Pieces(tok, () if reply.prompt else prompt)
    offset = 0
    for i, entry in enumerate(reply.prompt + reply.tokens):
        if i == len(reply.prompt) and reply.prompt:
            offset = len(echo)  # the reply's text follows the prompt as it was sent
        text = pieces.next(entry.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry.logprob)
        out["top_logprobs"].append(None if entry.logprob is None else {pieces.alone(t): lp for t, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_logprobs(tok, prompt: list[int], entries: list) -> dict:
    """The chat API's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    pieces = _Pieces(tok, prompt)

    def item(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(pieces.next(e.token), e.logprob),
                         "top_logprobs": [item(pieces.alone(t), lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


async def _unless_gone(awaitable, http: HTTPRequest):
    """The awaitable's result, or None when the client closes its connection first."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            # how a reply given up on ends (cancelled; gather's future reports that as its error) is nobody's
            # to hear: unretrieved, asyncio would log it with a traceback for every client that leaves
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task.result() if task.done() else None


async def _disconnected(http: HTTPRequest):
    """Returns when the client closes its connection (the body is already read, so receive() waits for that)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _generation_error(exc: Exception) -> APIError:
    """A request that could not be answered: its own input is a 400 (CamelidError), a fault of the model
    (ModelError) or anything else the server's 500."""
    if isinstance(exc, CamelidError) and not isinstance(exc, ModelError):
        return APIError(400, str(exc), code="invalid_request")
    return APIError(500, f"generation failed: {exc}", code="model_error" if isinstance(exc, ModelError) else None,
                    kind="server_error")


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.prompt) + len(req.tokens)}


def _echo(eng: Engine, body, sent) -> str:
    """What a completion with `echo` puts before its text: the prompt as sent, or as its tokens read."""
    if not getattr(body, "echo", False):
        return ""
    return sent if isinstance(sent, str) else eng.lm.tokenizer.decode(sent)


class _ChoiceStream:
    """One choice of a streamed reply: its engine events become OpenAI chunks, each carrying the logprobs of
    the tokens its text comes from, tool calls held back and sent as tool_calls deltas."""

    def __init__(self, eng: Engine, req: Request, index: int, meta: dict, chat: bool, echo: str,
                 tools: _Tools | None):
        self.req, self.index, self.meta, self.chat, self.echo = req, index, meta, chat, echo
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.tok, self.pending = eng.lm.tokenizer, Reply()
        self.calls = tool_calls.CallStream(tools.syntax, tools.names) if tools is not None else None
        self.offset = len(echo)
        self.context = list(req.prompt)  # what the pending tokens follow (the engine's req.tokens may be further)

    def _logprobs(self):
        if self.req.logprobs is None:
            return None
        if self.chat:
            out = _chat_logprobs(self.tok, self.context, self.pending.tokens)
        else:
            out = _completion_logprobs(self.tok, self.context, self.pending, self.echo)
            if not self.pending.prompt:
                out["text_offset"] = [o + self.offset for o in out["text_offset"]]
        self.context.extend(e.token for e in self.pending.tokens)
        self.pending.tokens, self.pending.prompt = [], []
        return out

    def chunk(self, delta_or_text, finish=None) -> str:
        choice = {"index": self.index, "logprobs": self._logprobs(), "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta_or_text
        else:
            self.offset += len(delta_or_text)
            choice["text"] = delta_or_text
        return "data: " + json.dumps({**self.meta, "object": self.obj, "choices": [choice]}, ensure_ascii=False) + \
            "\n\n"

    def start(self) -> list[str]:
        out = [self.chunk({"role": "assistant", "content": ""})] if self.chat else []
        if self.echo and not self.req.prompt_logprobs:  # the prompt first, as a completion with echo returns it
            out.append(self.chunk(self.echo))
        return out

    def handle(self, kind: str, value) -> list[str]:
        """The chunks an event makes (an "error" or "done" event ends the choice)."""
        if kind == "prompt":  # echo with logprobs: the prompt's text and its tokens' log-probabilities
            self.pending.prompt, self.offset = value, 0
            return [self.chunk(self.echo)]
        if kind == "token":
            self.pending.tokens.append(value)
            return []
        if kind == "text":
            content = self.calls.push(value) if self.calls is not None else value
            return [self.chunk({"content": content} if self.chat else content)] if content else []
        if kind == "error":
            err = _generation_error(value)
            return ["data: " + json.dumps({"error": {"message": err.message, "type": err.kind, "code": err.code}},
                                          ensure_ascii=False) + "\n\n"]
        out, finish = [], self.req.finish_reason
        if self.calls is not None:
            content, found = self.calls.finish()
            if content:
                out.append(self.chunk({"content": content}))
            for i, call in enumerate(found):  # the call's name first, then its arguments, as OpenAI does
                head = call.as_openai(i)
                head["function"] = {"name": call.name, "arguments": ""}
                out += [self.chunk({"tool_calls": [head]}),
                        self.chunk({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})]
            finish = "tool_calls" if found else finish
        return out + [self.chunk({} if self.chat else "", finish)]


async def _sse(eng: Engine, requests: list[Request], events: asyncio.Queue, meta: dict, chat: bool,
               include_usage: bool, first: tuple, echo: str = "", tools: _Tools | None = None, shared_prompt=False):
    """Server-sent events in OpenAI's chunk format, the choices' chunks as they come (each with its index),
    ending with `data: [DONE]`. A client that goes away cancels the generator here, which cancels its
    requests in the engine; an error ends the stream."""
    streams = [_ChoiceStream(eng, req, i, meta, chat, echo, tools) for i, req in enumerate(requests)]
    live = set(range(len(streams)))
    try:
        for stream in streams:
            for line in stream.start():
                yield line
        index, kind, value = first
        while True:
            for line in streams[index].handle(kind, value):
                yield line
            if kind == "error":
                break
            if kind == "done":
                live.discard(index)
                if not live:
                    break
            index, kind, value = await events.get()
        if include_usage and kind != "error":
            usage = {k: sum(_usage(r)[k] for r in requests) for k in ("prompt_tokens", "completion_tokens")}
            if shared_prompt:
                usage["prompt_tokens"] = len(requests[0].prompt)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield "data: " + json.dumps({**meta, "object": streams[0].obj, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for req in requests:
            if req.finish_reason is None:
                req.cancel()


def prometheus_text(eng: Engine | None) -> str:
    m = eng.metrics if eng else None
    rows = [
        ("camelid_requests_total", "counter", "Requests accepted.", m and m.requests_total),
        ("camelid_requests_finished_total", "counter", "Requests completed.", m and m.requests_finished),
        ("camelid_requests_cancelled_total", "counter", "Requests cancelled by their client.",
         m and m.requests_cancelled),
        ("camelid_requests_rejected_total", "counter", "Requests refused with 429.", m and m.requests_rejected),
        ("camelid_requests_failed_total", "counter", "Requests the engine could not finish (an error event).",
         m and m.requests_failed),
        ("camelid_prompt_tokens_total", "counter", "Prompt tokens processed.", m and m.prompt_tokens),
        ("camelid_generated_tokens_total", "counter", "Tokens generated.", m and m.generated_tokens),
        ("camelid_queue_depth", "gauge", "Requests waiting for a batch slot.", eng and eng.queue_depth),
        ("camelid_running_requests", "gauge", "Requests being decoded.", eng and eng.running),
        ("camelid_decode_steps_total", "counter", "Batched decode steps.", m and m.decode_steps),
        ("camelid_decode_batch_size_sum", "counter", "Sum of batch sizes over decode steps.",
         m and m.batch_size_sum),
        ("camelid_prefill_chunks_total", "counter", "Prompt chunks prefilled.", m and m.prefill_chunks),
        ("camelid_prefilled_tokens_total", "counter", "Prompt tokens computed (not found in the prefix cache).",
         m and m.prefilled_tokens),
        ("camelid_kv_blocks", "gauge", "Blocks in the KV cache pool.", eng and eng.pool.n_blocks),
        ("camelid_kv_block_tokens", "gauge", "Tokens per KV block.", eng and eng.pool.block_size),
        ("camelid_kv_blocks_used", "gauge", "KV blocks held by running requests.", eng and eng.pool.used),
        ("camelid_kv_blocks_cached", "gauge", "Idle KV blocks kept for their prefix.", eng and eng.pool.cached),
        ("camelid_kv_blocks_reserved", "gauge", "KV blocks promised to running requests, not yet taken.",
         eng and eng.pool.reserved),
        ("camelid_kv_cache_bytes", "gauge", "Bytes of the KV cache pool.", eng and eng.cache.nbytes),
        ("camelid_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
         eng and eng.pool.stats.prefix_queries),
        ("camelid_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
         eng and eng.pool.stats.prefix_hits),
        ("camelid_kv_evictions_total", "counter", "Cached KV blocks reused for other requests.",
         eng and eng.pool.stats.evictions),
        ("camelid_speculative_rounds_total", "counter", "Drafts verified (one per row and pass).",
         m and m.speculative_rounds),
        ("camelid_speculative_drafted_tokens_total", "counter", "Tokens drafted (prompt lookup or the draft model).",
         m and m.speculative_drafted),
        ("camelid_speculative_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
         m and m.speculative_accepted),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value or 0}"]
    for name, help_text, total in (("camelid_request_latency_seconds", "Request latency.",
                                    m and m.latency_seconds_sum),
                                   ("camelid_time_to_first_token_seconds", "Time to first token.",
                                    m and m.ttft_seconds_sum)):
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} summary", f"{name}_sum {total or 0:.6f}",
                f"{name}_count {m.requests_finished if m else 0}"]
    return "\n".join(out) + "\n"
