"""The models one server serves. The first loads at start-up; the others load on their first request, and past
`max_models` loaded models (or `max_bytes` of their weights and KV caches) the least recently used idle one is
unloaded. LoRA adapters are models of their own over their base: their requests run in the base's batches,
each row with its own adapter (model/lora.py's MultiLoRALinear), the base's weights shared."""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from camelid.errors import CamelidError
from camelid.formats.loaded import LoadedModel
from camelid.formats.peft import load_adapter
from camelid.model.lora import set_adapters, take_adapter
from camelid.serve.engine import Engine


class ModelsBusy(Exception):
    """Every loaded model is running requests, so none can be unloaded to make room for another."""


class UnknownModel(KeyError):
    pass


class AdapterBusy(CamelidError):
    pass


@dataclass
class Served:
    name: str
    load: Callable[[], LoadedModel]
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, folder), served unmerged
    draft: Callable[[], object] | None = None  # loads the smaller model that drafts its requests' tokens
    engine: Engine | None = None
    updates: list = field(default_factory=list)  # the adapters' matrices, id k + 1 at k (None: a freed id)
    error: str | None = None
    last_used: float = 0.0
    pins: int = 0  # requests between choosing this engine and submitting to it
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def idle(self) -> bool:
        return self.engine is not None and self.pins == 0 and self.engine.queue_depth == 0 \
            and self.engine.running == 0


class ModelPool:
    def __init__(self, models: list[Served], make_engine: Callable[[LoadedModel, object], Engine], max_models: int = 0,
                 max_bytes: int = 0):
        names = [m.name for m in models] + [a for m in models for a, _ in m.adapters]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise CamelidError(f"two served models are named {sorted(dupes)[0]!r} (give NAME=PATH)")
        self.models = {m.name: m for m in models}
        self.adapter_of = {a: (m.name, i) for m in models for i, (a, _) in enumerate(m.adapters, 1)}
        self.default = models[0].name
        self.make_engine = make_engine
        self.max_models, self.max_bytes = max_models or len(models), max_bytes
        self._lock = threading.Lock()  # choosing what to load and unload

    def names(self) -> list[tuple[str, str | None]]:
        """(name, its base for an adapter), every servable model."""
        return [(n, None) for n in self.models] + [(a, base) for a, (base, _) in self.adapter_of.items()]

    def resolve(self, name: str) -> tuple[Served, int]:
        """The served model a request's `model` names ("" is the first) and the adapter id (0: none)."""
        name = name or self.default
        if name in self.adapter_of:
            base, adapter = self.adapter_of[name]
            return self.models[base], adapter
        if name not in self.models:
            raise UnknownModel(name)
        return self.models[name], 0

    def checkout(self, name: str) -> tuple[Served, Engine, int]:
        """The engine for `name`, loaded now if it is not (blocking: call from a worker thread), pinned until
        `checkin` so it is not unloaded before the request reaches it."""
        served, adapter = self.resolve(name)
        with served.lock:  # one load per model, however many requests wait for it
            if served.engine is None:  # a stopped engine stays as it is: /health and its requests say why
                self._load(served)
            if served.engine is None:
                raise CamelidError(f"the model {served.name!r} failed to load: {served.error}")
            served.pins += 1
            served.last_used = time.monotonic()
        return served, served.engine, adapter

    def checkin(self, served: Served):
        with served.lock:
            served.pins -= 1

    def loaded(self) -> list[Served]:
        return [m for m in self.models.values() if m.engine is not None]

    def _load(self, served: Served):
        with self._lock:
            self._unload_until(lambda: len(self.loaded()) < self.max_models, keep=served)
        try:
            lm = self._with_adapters(served)
            served.engine, served.error = self.make_engine(lm, served.draft() if served.draft else None), None
        except Exception as exc:  # the request's error (and /health's, for the first model); never a crash
            served.error = str(exc) or type(exc).__name__
            raise CamelidError(f"the model {served.name!r} failed to load: {served.error}") from None
        with self._lock:
            if self.max_bytes:
                self._unload_until(lambda: sum(engine_bytes(m.engine) for m in self.loaded()) <= self.max_bytes,
                                   keep=served, required=False)

    def _with_adapters(self, served: Served) -> LoadedModel:
        lm = served.load()
        if served.adapters:
            _adaptable(lm, served.name)
            served.updates = [take_adapter(load_adapter(lm.model, folder)) for _, folder in served.adapters]
            set_adapters(lm.model, served.updates)
        return lm

    def add_adapter(self, name: str, folder: str) -> None:
        """Serve another adapter of the first model from now on (between two of its engine's steps)."""
        if name in self.models or name in self.adapter_of:
            raise CamelidError(f"lora_name: a model named {name!r} is already served")
        served, eng, _ = self.checkout(self.default)
        try:
            _adaptable(eng.lm, served.name)
            def load():  # in the engine's thread: no forward runs while its layers change
                try:
                    updates = take_adapter(load_adapter(eng.model, folder))
                except BaseException:
                    take_adapter(eng.model)  # an adapter that did not fit leaves no layer of it behind
                    raise
                served.updates.append(updates)
                set_adapters(eng.model, served.updates)
                eng.use_adapters()

            eng.between_steps(load).result()
            served.adapters.append((name, folder))
            self.adapter_of[name] = (served.name, len(served.updates))
        finally:
            self.checkin(served)

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter; its id is freed, the others keep theirs. Refused while requests use it."""
        if name not in self.adapter_of:
            raise UnknownModel(name)
        base, adapter = self.adapter_of[name]
        served = self.models[base]
        if served.engine is not None:
            def free():
                if served.engine.uses_adapter(adapter):
                    raise AdapterBusy(f"lora_name: requests for {name!r} are running; try again when they end")
                served.updates[adapter - 1] = None
                set_adapters(served.engine.model, served.updates)

            served.engine.between_steps(free).result()
        del self.adapter_of[name]
        served.adapters = [(n, f) for n, f in served.adapters if n != name]

    def _unload_until(self, enough: Callable[[], bool], keep: Served, required: bool = True):
        while not enough():
            idle = sorted((m for m in self.loaded() if m is not keep and m.idle), key=lambda m: m.last_used)
            if not idle:
                if required:
                    raise ModelsBusy(f"all {len(self.loaded())} loaded models are busy (--max-models "
                                     f"{self.max_models}); try again shortly")
                logging.getLogger("camelid.serve").warning("over --max-model-memory: every other model is busy")
                return
            victim = idle[0]
            with victim.lock:  # a request may be choosing it right now: then it is not idle any more
                if not victim.idle:
                    continue
                victim.engine.shutdown()
                victim.engine = None
            gc.collect()

    def shutdown(self):
        for m in self.loaded():
            m.engine.shutdown()


def _adaptable(lm: LoadedModel, name: str):
    if lm.config.n_encoder_layers:
        raise CamelidError(f"{name}: LoRA adapters are served on decoder-only models; this one is an "
                           "encoder-decoder (T5)")


def engine_bytes(engine: Engine | None) -> int:
    """What a loaded model holds: its weights and buffers, and its KV cache."""
    if engine is None:
        return 0
    tensors = [*engine.model.parameters(), *engine.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) + engine.cache.nbytes
