"""`camelid quantize`: a camelid folder with int8 or int4 weights (round-to-nearest, or GPTQ for int4)."""

from __future__ import annotations

from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.formats.load import LoadedModel, save_native
from camelid.model.quant import INT4_GROUPS, QUANTIZED, output_mode, quantize_model


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
             samples: int = 128, seq_len: int = 512, seed: int = 0, output: str | None = None) -> dict:
    """Quantizes `lm` in place; returns the description stored in the folder's camelid.json. `output` is the
    output layer's mode (default int8: see `output_mode`)."""
    if any(isinstance(m, QUANTIZED) for m in lm.model.modules()):
        raise CamelidError(f"{lm.source}: already quantized ({(lm.quantization or {}).get('mode', '?')})")
    if mode not in ("int8", "int4"):
        raise CamelidError(f"--mode {mode!r}: use int8 or int4")
    if group not in INT4_GROUPS:
        raise CamelidError(f"--group-size {group}: use one of {', '.join(map(str, INT4_GROUPS))}")
    try:
        output = output_mode(mode, output)
    except CamelidError as e:
        raise CamelidError(f"--output-mode: {e}") from None
    if method == "gptq":
        if mode != "int4":
            raise CamelidError("--method gptq quantizes to int4: add --mode int4")
        if not calibration:
            raise CamelidError("--method gptq needs --calibration FILE... (text to measure the layers' inputs)")
        from camelid.model.gptq import gptq_quantize_model

        seq_len = min(seq_len, lm.config.max_seq_len)
        batches = calibration_batches(lm, calibration, samples, seq_len, seed)
        counts = gptq_quantize_model(lm.model.float(), batches, group, output=output)
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


def quantize_folder(lm: LoadedModel, out: str | Path, **options) -> dict:
    info = quantize(lm, **options)
    save_native(lm, out)
    return info
