"""`camelid quantize`: a camelid folder with int8 or int4 weights (round-to-nearest, or GPTQ for int4)."""

from __future__ import annotations

from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.formats.load import export_gptq, load_model, save_native
from camelid.formats.loaded import LoadedModel
from camelid.model.quant import (
    INT4_GROUPS,
    QUANTIZED,
    GGMLLinear,
    Int4Linear,
    Int8Linear,
    QuantSpec,
    output_mode,
    quantize_model,
)


def calibration_batches(lm: LoadedModel, files: list[str], samples: int, seq_len: int, seed: int = 0,
                        batch: int = 8) -> list[torch.Tensor]:
    """`samples` random windows of `seq_len` tokens from the files (GPTQ used 128 windows of C4)."""
    from camelid.data.corpus import read_corpus

    text = "\n\n".join(d.text for d in read_corpus(files))
    ids = lm.tokenizer.encode(text, bos=False)
    if len(ids) < seq_len + 1:
        raise CamelidError(f"--calibration: {len(ids)} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=g).tolist()
    tokens = torch.tensor([ids[s:s + seq_len] for s in starts], device=lm.model.device)
    return list(tokens.split(batch))


def quantize(lm: LoadedModel, mode: str, group: int = 32, method: str = "rtn", calibration: list[str] | None = None,
             samples: int = 128, seq_len: int = 512, seed: int = 0, output: str | None = None,
             integer_zeros: bool = False) -> dict:
    """Quantizes `lm` in place; returns the description stored in the folder's camelid.json. `output` is the
    output layer's mode (default int8: see `output_mode`); `integer_zeros`: GPTQ checkpoints' zero points."""
    _check_not_quantized(lm)
    output = _checked_options(mode, group, output)
    if method == "gptq":
        if mode != "int4":
            raise CamelidError("--method gptq quantizes to int4: add --mode int4")
        if not calibration:
            raise CamelidError("--method gptq needs --calibration FILE... (text to measure the layers' inputs)")
        from camelid.model.gptq import gptq_quantize_model

        seq_len = min(seq_len, lm.config.max_seq_len)
        batches = calibration_batches(lm, calibration, samples, seq_len, seed)
        counts = gptq_quantize_model(lm.model.float(), batches, group, output=output, integer_zeros=integer_zeros)
    elif method == "rtn":
        counts = quantize_model(lm.model, mode, group, output)
    else:
        raise CamelidError(f"--method {method!r}: use rtn or gptq")
    lm.model.tie_weights()
    lm.quantization = {"mode": mode, "method": method, "layers": counts, "output": output,
                       **({"group_size": group} if mode == "int4" else {}),
                       **({"calibration_samples": samples, "calibration_seq_len": seq_len} if method == "gptq"
                          else {})}
    return lm.quantization


def quantize_folder(lm: LoadedModel, out: str | Path, force: bool = False, layout: str = "camelid",
                    **options) -> dict:
    """Quantize and write a camelid folder, or (`layout` gptq) a Hugging Face folder in GPTQModel's layout."""
    if layout == "gptq":
        if options.get("method") != "gptq" or options.get("mode") != "int4" or \
                options.get("output") not in (None, "float"):
            raise CamelidError("--format gptq writes GPTQ's 4-bit layers: use --method gptq --mode int4 (the "
                               "output layer stays float)")
        info = quantize(lm, **{**options, "output": "float"}, integer_zeros=True)
        export_gptq(lm, out, options.get("group", 32), force)
        return info
    info = quantize(lm, **options)
    save_native(lm, out, force=force)
    return info


def quantize_while_loading(source: str | Path, out: str | Path, mode: str, group: int = 32,
                           output: str | None = None, tokenizer: str | None = None, force: bool = False) -> dict:
    """Round-to-nearest as `quantize` does, but tensor by tensor while the model loads, so a checkpoint larger
    than memory as floats still quantizes. Writes the folder; returns its description. Models whose output
    layer is tied to the embeddings go through `quantize_folder`: their output layer exists only as the
    embedding table until the model is built."""
    output = _checked_options(mode, group, output)
    lm = load_model(source, "cpu", "fp32", tokenizer, quantize=QuantSpec(mode, group, output))
    _check_not_quantized(lm, just_now=True)
    kinds = [type(m) for m in lm.model.modules()]
    lm.quantization = {"mode": mode, "method": "rtn",
                       "layers": {"int8": kinds.count(Int8Linear), "int4": kinds.count(Int4Linear)},
                       "output": output, **({"group_size": group} if mode == "int4" else {})}
    save_native(lm, out, force=force)
    return lm.quantization


def _checked_options(mode: str, group: int, output: str | None) -> str:
    """The output layer's mode, once the options are known to be valid."""
    if mode not in ("int8", "int4"):
        raise CamelidError(f"--mode {mode!r}: use int8 or int4")
    if group not in INT4_GROUPS:
        raise CamelidError(f"--group-size {group}: use one of {', '.join(map(str, INT4_GROUPS))}")
    try:
        return output_mode(mode, output)
    except CamelidError as e:
        raise CamelidError(f"--output-mode: {e}") from None


def _check_not_quantized(lm: LoadedModel, just_now: bool = False):
    """A model whose source was quantized already (its own description, or GGUF blocks) is not quantized again."""
    already = lm.quantization or any(isinstance(m, GGMLLinear) for m in lm.model.modules())
    if already or (not just_now and any(isinstance(m, QUANTIZED) for m in lm.model.modules())):
        raise CamelidError(f"{lm.source}: already quantized ({(lm.quantization or {}).get('mode', '?')})")
