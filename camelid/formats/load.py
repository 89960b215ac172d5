"""Open any model camelid understands, and write the native and Hugging Face folders.

A camelid folder is `camelid.json` (model config, tokenizer settings, chat template and stop strings) +
`model.safetensors` in camelid's own tensor names (so loading is a zero-copy memory map) + the tokenizer file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from camelid.errors import CamelidError
from camelid.families import family
from camelid.files import output_folder, read_json
from camelid.formats import ggml_legacy, gguf, gptq_awq, hf, llama2c, meta
from camelid.formats.gguf_file import read_gguf
from camelid.formats.loaded import LoadedModel
from camelid.formats.tensors import load_safetensors, load_tensor_files, release_pages, save_safetensors
from camelid.model.config import ModelConfig
from camelid.model.quant import (
    QUANTIZED,
    GGMLEmbedding,
    GGMLLinear,
    Int4Linear,
    Int8Linear,
    QuantSpec,
    layer_modes,
    prepare_layers,
    quantized_buffers,
    quantized_shells,
)
from camelid.model.t5 import T5
from camelid.model.transformer import Transformer, rope_tables
from camelid.tokenizer.chat_template import resolve_template
from camelid.tokenizer.fastchat_formats import template_for_model
from camelid.tokenizer.gguf_vocab import gguf_tokenizer
from camelid.tokenizer.piece_vocab import read_llama2c_tokenizer, to_hf_tokenizer
from camelid.tokenizer.storage import load_saved_tokenizer, save_tokenizer
from camelid.tokenizer.thudm import ChatGLM3Backend, ChatGLM6BBackend, chatglm6b_tokenizer_config
from camelid.tokenizer.tokenizer import (
    PieceBackend,
    SentencePieceBackend,
    Tokenizer,
    load_hf_tokenizer,
    load_tokenizer_file,
    piece_tokenizer,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT_VERSION = 1


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise CamelidError(f"--device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CamelidError(f"--device {device}: no CUDA device is available")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise CamelidError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CamelidError("--device mps: no MPS device is available")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise CamelidError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    return DTYPES[dtype]


def tensor_converter(cfg: ModelConfig, source: str, device="cpu", dtype=torch.float32,
                     quantize: QuantSpec | None = None) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What loading does to each checkpoint tensor, one at a time: float tensors move to the device and dtype
    (packed integer weights and int4 scales keep theirs: the kernels cast scales once, as they need). With
    `quantize`, the float weights of the layers it names become int8/int4 buffers on the way, so the float
    model never exists whole: QLoRA and big checkpoints load in about their quantized size."""
    modes, shapes = {}, {}
    if quantize:
        with torch.device("meta"):
            shell = (T5 if cfg.n_encoder_layers else Transformer)(cfg)
        modes = layer_modes(shell, quantize.mode, quantize.group, quantize.output)
        if cfg.tie_embeddings:  # the output layer is the embedding table, which stays float
            modes.pop("output", None)
        shapes = {name: (m.out_features, m.in_features) for name, m in shell.named_modules() if name in modes}

    def convert(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and layer in modes and t.is_floating_point():
            if tuple(t.shape) != shapes[layer]:
                raise CamelidError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, "
                                   f"the config needs {shapes[layer]}")
            buffers = quantized_buffers(t.to(device), modes[layer], quantize.group, dtype)
            release_pages(t)
            return {f"{layer}.{k}": v for k, v in buffers.items()}
        out = t.to(device=device, dtype=dtype) if t.is_floating_point() and leaf != "scales_zeros" else t.to(device)
        if out.data_ptr() != t.data_ptr():
            release_pages(t)
        return {key: out}

    return convert


def build_model(cfg: ModelConfig, sd: dict, source: str, device="cpu", dtype=torch.float32,
                quantize: QuantSpec | None = None) -> Transformer:
    """A model whose parameters are the given tensors (no copy when device and dtype already match), each
    converted by `tensor_converter` as it is taken."""
    convert = tensor_converter(cfg, source, device, dtype, quantize)
    sd = dict(sd)
    sd = {k: v for key in list(sd) for k, v in convert(key, sd.pop(key)).items()}
    with torch.device("meta"):
        model = (T5 if cfg.n_encoder_layers else Transformer)(cfg)
        quantized_shells(model, sd)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings and isinstance(model.output, torch.nn.Linear):
        expected.pop("output.weight")
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    for name, shape in expected.items():
        if name not in sd:
            raise CamelidError(f"{source}: missing tensor {name!r}")
        if tuple(sd[name].shape) != tuple(shape):
            raise CamelidError(f"{source}: tensor {name!r} has shape {tuple(sd[name].shape)}, "
                               f"the config needs {tuple(shape)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CamelidError(f"{source}: unexpected tensor {extra[0]!r}")
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    if isinstance(model.tok_embeddings, GGMLEmbedding):
        model.tok_embeddings.out_dtype = dtype
    if cfg.rotates:
        for name, table in rope_tables(cfg).items():
            setattr(model, name, table.to(device))
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, device: str | None = "cpu", dtype: str | None = None,
               tokenizer_path: str | Path | None = None, quantize: QuantSpec | None = None) -> LoadedModel:
    """Open a model; with `quantize`, its float layers are quantized tensor by tensor as they load."""
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    lm = _load(path, dev, dt, tokenizer_path, quantize)
    lm.tokenizer.validate(str(path), lm.config.vocab_size)
    # here, once the loaders' tensor dicts are gone, so a repacked layer's file layout is freed layer by layer
    # instead of living beside the copy
    prepare_layers(lm.model)
    return lm


def _load(path: Path, dev, dt, tokenizer_path, quantize) -> LoadedModel:
    return _format_of(path).load(path, dev, dt, quantize, tokenizer_path)


@dataclass(frozen=True)
class _Format:
    name: str
    recognises: Callable[[Path], bool]
    load: Callable[..., LoadedModel]  # (path, device, dtype, quantize, tokenizer_path)
    config: Callable[[Path], ModelConfig]  # the config alone, without the weights


def is_model(path: str | Path) -> bool:
    """Whether camelid can open `path` as a model (a folder of models is not one)."""
    path = Path(path)
    return path.exists() and any(fmt.recognises(path) for fmt in FORMATS)


def _format_of(path: Path) -> _Format:
    if not path.exists():
        raise CamelidError(f"{path}: no such file or directory")
    for fmt in FORMATS:
        if fmt.recognises(path):
            return fmt
    raise CamelidError(f"{path}: not a model camelid can open (" + ", ".join(f.name for f in FORMATS) + ")")


def _is_gguf(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_native_meta(folder: Path) -> dict:
    """camelid.json, every section checked for its type before anything is built from it."""
    meta_path = folder / "camelid.json"
    meta = read_json(meta_path)
    for key, kind in (("model", dict), ("tokenizer", dict), ("chat", dict), ("quantization", dict)):
        if key in ("model", "tokenizer") and key not in meta:
            raise CamelidError(f"{meta_path}: missing key {key!r}")
        if key in meta and not isinstance(meta[key], kind):
            raise CamelidError(f"{meta_path}: {key!r} must be an object, not {type(meta[key]).__name__}")
    chat = meta.setdefault("chat", {})
    if not isinstance(chat.setdefault("template", "raw"), str):
        raise CamelidError(f"{meta_path}: chat.template must be a string (a template name or Jinja source)")
    stop = chat.setdefault("stop", [])
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise CamelidError(f"{meta_path}: chat.stop must be a list of strings, got {stop!r}")
    return meta


def _load_native(folder: Path, device, dtype, quantize=None, _tokenizer_path=None) -> LoadedModel:
    meta_path = folder / "camelid.json"
    meta = read_native_meta(folder)
    cfg = ModelConfig.from_dict(meta["model"], str(meta_path))
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise CamelidError(f"{folder}: model.safetensors is missing")
    tok = load_saved_tokenizer(folder, meta["tokenizer"])  # a broken tokenizer fails before the weights load
    model = build_model(cfg, load_safetensors(weights), str(weights), device, dtype, quantize)
    chat = meta["chat"]
    return LoadedModel(model, tok, chat["template"], list(chat["stop"]), str(folder), meta.get("quantization"))


def _load_hf(folder: Path, device, dtype, quantize=None, tokenizer_path=None) -> LoadedModel:
    hf_config = hf.read_hf_config(folder)
    cfg = hf.config_from_hf(hf_config, str(folder / "config.json"))
    # converted (and quantized) as they are renamed and q/k/v or gate/up fused: no float copy of the whole
    # model; build_model then finds them in place
    tensors = load_tensor_files(folder)
    quantized = gptq_awq.quant_format(folder, hf_config, tensors)
    load_note = ""
    if quantized is not None:
        tensors, load_note = gptq_awq.dequantized_state_dict(tensors, quantized, str(folder))
    sd = hf.state_dict_from_hf(tensors, cfg, str(folder), tensor_converter(cfg, str(folder), device, dtype, quantize))
    model = build_model(cfg, sd, str(folder), device, dtype)
    del sd, tensors
    if tokenizer_path is None:
        tok = load_hf_tokenizer(folder, hf_config)
    else:  # one the folder's own cannot give (a tokenizer written as the model's Python code)
        path = Path(tokenizer_path)
        tok = load_hf_tokenizer(path, hf_config) if path.is_dir() else load_tokenizer_file(path)
    template, stop, note = _template(tok, cfg, folder)
    return LoadedModel(model, tok, template, stop, str(folder), template_note=note, load_note=load_note)


def _template(tok, cfg: ModelConfig, path: Path) -> tuple[str, list[str], str]:
    """The model's own chat template; or else the FastChat format its name or path calls for, as FastChat's
    model adapters match them (the seed-era chat models shipped none), with a note saying so; or else its
    family's, with the family's stop strings."""
    if tok.chat_template:
        return tok.chat_template, [], ""
    fastchat = template_for_model(str(path))
    if fastchat is not None:
        return fastchat, [], (f"{path.name} has no chat template: using FastChat's {fastchat!r}, matched by its "
                              "name (--template to choose another)")
    fam = family(cfg.arch)
    return fam.template, list(fam.stop), ""


def _load_gguf(path: Path, device, dtype, quantize=None, _tokenizer_path=None) -> LoadedModel:
    return _load_gguf_file(read_gguf(path), device, dtype, quantize)


def _load_legacy_ggml(path: Path, device, dtype, quantize=None, _tokenizer_path=None) -> LoadedModel:
    """llama.cpp's 2023 files, read as the GGUF file its converter makes of them (formats/ggml_legacy.py)."""
    gf, note = ggml_legacy.read_legacy_ggml(path)
    lm = _load_gguf_file(gf, device, dtype, quantize)
    lm.load_note = note
    return lm


def _load_gguf_file(gf, device, dtype, quantize=None) -> LoadedModel:
    path = gf.path
    cfg = gguf.config_from_gguf(gf)
    tok = gguf_tokenizer(gf.metadata, str(path))
    if tok.vocab_size > cfg.vocab_size:
        raise CamelidError(f"{path}: the tokenizer has {tok.vocab_size} tokens, token_embd only {cfg.vocab_size}")
    sd, packed = gguf.state_dict_from_gguf(gf, cfg, dtype, cpu_kernel=torch.device(device).type == "cpu")
    model = build_model(cfg, sd, str(path), device, dtype, quantize)
    del sd
    prepare_layers(model, packed)
    template, stop, note = _template(tok, cfg, path)
    return LoadedModel(model, tok, template, stop, str(path), template_note=note)


def _load_meta(folder: Path, device, dtype, quantize=None, tokenizer_path=None) -> LoadedModel:
    """Meta's consolidated.*.pth + params.json (formats/meta.py), through the Hugging Face path."""
    cfg, sp = meta.open_params(folder, tokenizer_path)
    sd = hf.state_dict_from_hf(meta.MetaTensors(folder, cfg), cfg, str(folder),
                               tensor_converter(cfg, str(folder), device, dtype, quantize))
    model = build_model(cfg, sd, str(folder), device, dtype)
    del sd
    tok = Tokenizer(SentencePieceBackend(sp), sp.bos_id(), [sp.eos_id()], True, None,
                    {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id())})
    template, stop, note = _template(tok, cfg, folder)
    return LoadedModel(model, tok, template, stop, str(folder), template_note=note)


def _load_llama2c(path: Path, device, dtype, quantize=None, tokenizer_path=None) -> LoadedModel:
    cfg, sd = llama2c.read_llama2c(path)
    model = build_model(cfg, sd, str(path), device, dtype, quantize)
    tok_path = Path(tokenizer_path) if tokenizer_path else llama2c.find_llama2c_tokenizer(path, cfg.vocab_size)
    vocab = read_llama2c_tokenizer(tok_path, cfg.vocab_size)
    # run.c ends a sample at BOS: llama2.c models separate documents with it.
    tok = piece_tokenizer(vocab, bos_id=1, eos_ids=[2, 1])
    return LoadedModel(model, tok, "raw", [], str(path))


def _state_dict(model: Transformer) -> dict:
    sd = {k: v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and isinstance(model.output, torch.nn.Linear):
        sd.pop("output.weight", None)
    return sd


def plain_state_dict(lm: LoadedModel) -> dict:
    """Float tensors for every weight, quantized layers dequantized: for formats that quantize their own way."""
    sd = _state_dict(lm.model)
    for name, module in lm.model.named_modules():
        if isinstance(module, QUANTIZED):
            for key in ("scales", "scales_zeros", "blocks", "ggml_type"):
                sd.pop(f"{name}.{key}", None)
            sd[f"{name}.weight"] = module.dequantize()
        elif isinstance(module, GGMLEmbedding):
            sd.pop(f"{name}.blocks")
            sd.pop(f"{name}.ggml_type")
            sd[f"{name}.weight"] = module(torch.arange(module.num_embeddings)).float()
    return sd


def save_native(lm: LoadedModel, folder: str | Path, template: str | None = None, stop: list[str] | None = None,
                force: bool = False):
    """Write a camelid folder; written beside the target and renamed, so a failure leaves nothing half-done.
    An existing folder is replaced only if camelid wrote it and `force` is given."""
    template = template or lm.template
    resolve_template(template)
    with output_folder(folder, force) as tmp:
        _write_native(lm, tmp, template, stop)


def _write_native(lm: LoadedModel, tmp: Path, template: str, stop: list[str] | None):
    save_safetensors(_state_dict(lm.model), tmp / "model.safetensors", metadata={"format": "camelid"})
    meta = {"format": "camelid", "version": FORMAT_VERSION, "model": lm.config.to_dict(),
            **({"quantization": lm.quantization} if lm.quantization else {}),
            "tokenizer": save_tokenizer(lm.tokenizer, tmp),
            "chat": {"template": template, "stop": stop if stop is not None else lm.stop}}
    (tmp / "camelid.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(lm: LoadedModel, folder: str | Path, force: bool = False):
    """Write a Hugging Face folder (config, safetensors, tokenizer files) that transformers loads."""
    if any(isinstance(m, (*QUANTIZED, GGMLEmbedding)) for m in lm.model.modules()):
        raise CamelidError(f"{lm.source}: a quantized model cannot be written as a Hugging Face folder "
                           f"(export the float model, or use GGUF)")
    with output_folder(folder, force) as tmp:
        _write_hf(lm, tmp)


def export_gptq(lm: LoadedModel, folder: str | Path, group: int, force: bool = False):
    """Write a Hugging Face folder in GPTQModel's layout (what transformers, vLLM and TGI load as GPTQ) from a
    model whose block projections camelid's GPTQ quantized with GPTQ's zero points (formats/gptq_awq.py)."""
    loose = [name for name, m in lm.model.named_modules() if isinstance(m, (Int8Linear, GGMLLinear))]
    if loose or isinstance(lm.model.output, Int4Linear):
        raise CamelidError(f"{loose[0] if loose else 'output'}: GPTQ's layout holds 4-bit block projections and a "
                           f"float output layer; this layer is not one (its shape does not fit int4 groups of "
                           f"{group}, or --output-mode asked otherwise)")
    sd = _state_dict(lm.model)
    tensors = gptq_awq.gptq_tensors(sd, lm.config, group)
    config = gptq_awq.gptq_config(group, desc_act=any(k.endswith(".in_perm") for k in sd))
    with output_folder(folder, force) as tmp:
        _write_hf(lm, tmp, hf_tensors=tensors, extra={"config.json": {"quantization_config": config,
                                                                      "torch_dtype": "float16"},
                                                      "quantize_config.json": config})


def _write_hf(lm: LoadedModel, tmp: Path, hf_tensors: dict | None = None, extra: dict | None = None):
    tok = lm.tokenizer
    if isinstance(tok.backend, PieceBackend):  # transformers reads tokenizer.json, not our pieces file
        to_hf_tokenizer(tok.backend.vocab, tok.bos_id, tok.add_bos).save(str(tmp / "tokenizer.json"))
    else:
        save_tokenizer(tok, tmp)
    tcfg = {**tok.special_tokens_map, "add_bos_token": tok.add_bos, "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast"}
    source, _ = resolve_template(lm.template)
    tcfg["chat_template"] = source
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids[0] if len(tok.eos_ids) == 1 else tok.eos_ids}
    cfg_extra = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_ids[0] if tok.eos_ids else None}
    if isinstance(tok.backend, ChatGLM6BBackend):  # THUDM's tokenizer class, and its <sop> as config's BOS
        tcfg = chatglm6b_tokenizer_config(tok)
        gen = {"eos_token_id": tok.eos_ids[0]}
        cfg_extra = {"eos_token_id": tok.eos_ids[0]}
    elif isinstance(tok.backend, ChatGLM3Backend):  # THUDM's class reads it; no BOS, [gMASK] sop instead
        tcfg = {"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "clean_up_tokenization_spaces": False,
                "chat_template": source}
        gen = {"eos_token_id": tok.eos_ids}
        cfg_extra = {"eos_token_id": tok.eos_ids[0]}
    extra = extra or {}
    hf.save_hf_folder(_state_dict(lm.model), lm.config, tmp,
                      extra_json={**extra, "config.json": {**cfg_extra, **extra.get("config.json", {})},
                                  "tokenizer_config.json": tcfg, "generation_config.json": gen},
                      hf_tensors=hf_tensors)


def read_config(path: str | Path) -> ModelConfig:
    """A model's config without loading its weights (for `camelid info`)."""
    path = Path(path)
    return _format_of(path).config(path)


# How each format is recognised, in this order, and read.
FORMATS = [
    _Format("a camelid folder", lambda p: p.is_dir() and (p / "camelid.json").exists(), _load_native,
            lambda p: ModelConfig.from_dict(read_native_meta(p)["model"], str(p / "camelid.json"))),
    _Format("a Hugging Face folder with config.json", lambda p: p.is_dir() and (p / "config.json").exists(),
            _load_hf, lambda p: hf.config_from_hf(hf.read_hf_config(p), str(p / "config.json"))),
    _Format("Meta's params.json and consolidated.*.pth", meta.is_meta_folder, _load_meta,
            lambda p: meta.open_params(p)[0]),
    _Format("a GGUF file", lambda p: p.is_file() and _is_gguf(p), _load_gguf,
            lambda p: gguf.config_from_gguf(read_gguf(p))),
    _Format("llama.cpp's GGML/GGMF/GGJT .bin (2023)", lambda p: p.is_file() and ggml_legacy.is_legacy_ggml(p),
            _load_legacy_ggml, lambda p: gguf.config_from_gguf(ggml_legacy.read_legacy_ggml(p)[0])),
    _Format("a llama2.c .bin checkpoint", lambda p: p.is_file() and p.suffix == ".bin", _load_llama2c,
            lambda p: llama2c.read_llama2c(p)[0]),
]
