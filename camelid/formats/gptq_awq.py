"""GPTQ and AWQ checkpoints in Hugging Face folders: GPTQ-for-LLaMa's files (no config: bits and groups read from
the tensors), AutoGPTQ / GPTQModel folders (`quantize_config.json`, or `quantization_config` in config.json;
2, 3, 4 or 8 bits; groups of any size or one per row; symmetric or not; act-order `g_idx`) and AutoAWQ's GEMM
layout.

Each quantized layer's tensors (`qweight`, `qzeros`, `scales`, `g_idx`) become what camelid's layers hold, under
the layer's own name, before the family's renaming: 4-bit weights in groups the int4 kernel takes become its
(q, scale, zero) exactly (GPTQ's w = s (q - z) is camelid's (q - 8) s + s (8 - z)), act-order layers' inputs
sorted by group (`in_perm`: the layer gathers its input in that order); anything else (2, 3 or 8 bits, a shape
the kernel cannot take) is dequantized exactly to a float weight, which loading says.

GPTQ's layout: qweight (K * bits / 32, N) int32 packs inputs along K, low bits first; qzeros (groups, N * bits /
32) packs outputs, and stores z - 1 in the "gptq" (v1) checkpoint format that every tool writes (v2: z);
scales (groups, N) fp16; g_idx (K,) each input's group. (z - 1 is stored in `bits` bits: z = 0 is stored as
2^bits - 1 and read back modulo 2^bits, as AutoGPTQ reads it.) 3 bits run across int32 words: 32 values in 3 words.
AWQ's GEMM layout: qweight (K, N / 8) and qzeros (groups, N / 8) pack outputs in the order 0 2 4 6 1 3 5 7,
z stored as is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from camelid.errors import CamelidError
from camelid.files import read_json
from camelid.model.quant import INT4_GROUPS, int4_fits, kernel_scales_zeros, pack_int4

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class QuantFormat:
    method: str  # gptq | awq
    bits: int | None  # None: read from each layer's tensors (GPTQ-for-LLaMa's files carry no config)
    group: int | None  # -1: one group per row; None: from the tensors
    zero_offset: int  # added to stored zeros: 1 in GPTQ's v1 checkpoint format, else 0
    source: str


def quant_format(folder: Path, hf_config: dict, tensors: dict) -> QuantFormat | None:
    """The folder's quantization, or None for a float checkpoint."""
    qc, source = hf_config.get("quantization_config"), str(folder / "config.json")
    if qc is None and (folder / "quantize_config.json").exists():
        qc, source = read_json(folder / "quantize_config.json"), str(folder / "quantize_config.json")
    if qc is None:
        if not any(k.endswith(".qweight") for k in tensors):
            return None
        return QuantFormat("gptq", None, None, 1, "GPTQ-for-LLaMa's tensors")
    if not isinstance(qc, dict):
        raise CamelidError(f"{source}: quantization_config must be an object")
    method = qc.get("quant_method", "gptq")
    if method not in ("gptq", "awq"):
        raise CamelidError(f"{source}: quant_method {method!r} is not one camelid reads (gptq, awq)")
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    if bits not in ((2, 3, 4, 8) if method == "gptq" else (4,)):
        raise CamelidError(f"{source}: bits={bits!r} is not supported for {method} "
                           f"({'2, 3, 4 or 8' if method == 'gptq' else '4'})")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise CamelidError(f"{source}: group_size={group!r} must be a positive integer or -1")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise CamelidError(f"{source}: AWQ version {version!r} is not supported (gemm)")
        return QuantFormat("awq", bits, group, 0, source)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise CamelidError(f"{source}: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return QuantFormat("gptq", bits, group, 1 if fmt == "gptq" else 0, source)


def dequantized_state_dict(tensors: dict, fmt: QuantFormat, source: str) -> tuple[dict, str]:
    """The checkpoint with each quantized layer as camelid's int4 buffers (`weight` packed, `scales_zeros`)
    or an exactly dequantized float `weight`; and a note on what ran where."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    kernel, floats = 0, []
    for name in sorted(k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")):
        q, scales, zeros, g_idx = _unpacked(tensors, name, fmt, source)
        K, N = q.shape
        group = K // scales.shape[0] if fmt.group in (None, -1) else fmt.group
        # act-order: the inputs sorted by group make contiguous groups, and the layer takes its input in that order
        order = torch.argsort(g_idx, stable=True)
        grouped = torch.equal(g_idx[order], torch.arange(K) // group)
        if q.max() < 16 and fmt.bits in (None, 4) and grouped and group in INT4_GROUPS and int4_fits(N, K, group):
            s = scales.t().float()
            if not torch.equal(order, torch.arange(K)):
                q = q[order]
                out[f"{name}.in_perm"] = order
            out[f"{name}.weight"] = pack_int4(q.t().to(torch.uint8))
            out[f"{name}.scales_zeros"] = kernel_scales_zeros(s, s * (8 - zeros.t().float()), torch.float32)
            kernel += 1
        else:
            w = scales.float()[g_idx] * (q.float() - zeros.float()[g_idx])
            out[f"{name}.weight"] = w.t().contiguous()
            floats.append(name)
    note = f"{fmt.method.upper()} checkpoint: {kernel} layers on the int4 kernel"
    if floats:
        note += (f", {len(floats)} dequantized to float (e.g. {floats[0]}: a bit width, a group size or groups of "
                 f"unequal sizes the int4 kernel does not take)")
    return out, note


def _unpacked(tensors: dict, name: str, fmt: QuantFormat, source: str):
    """(q (K, N), scales (groups, N), zeros (groups, N) with the offset applied, g_idx (K,)) of one layer."""
    missing = [p for p in ("qzeros", "scales") if f"{name}.{p}" not in tensors]
    if missing:
        raise CamelidError(f"{source}: tensor {name}.{missing[0]!r} is missing beside {name}.qweight")
    qweight, qzeros, scales = (tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales"))
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or scales.dim() != 2:
        raise CamelidError(f"{source}: {name}: qweight and qzeros must be 2-D int32 tensors")
    groups, N = scales.shape
    if fmt.method == "awq":
        K, bits = qweight.shape[0], fmt.bits
        if qweight.shape[1] * 8 != N or qzeros.shape != (groups, N // 8):
            raise CamelidError(f"{source}: {name}: qweight {tuple(qweight.shape)} and qzeros "
                               f"{tuple(qzeros.shape)} do not fit scales {tuple(scales.shape)} in AWQ's layout")
        q, zeros = _awq_unpack(qweight), _awq_unpack(qzeros)
    else:
        bits = fmt.bits or qzeros.shape[1] * 32 // N
        K = qweight.shape[0] * 32 // max(bits, 1)
        if bits not in (2, 3, 4, 8) or qzeros.shape[1] * 32 != N * bits or qweight.shape[0] * 32 != K * bits:
            raise CamelidError(f"{source}: {name}: qweight {tuple(qweight.shape)} and qzeros "
                               f"{tuple(qzeros.shape)} do not fit scales {tuple(scales.shape)} at "
                               f"{fmt.bits or 'any'} bits")
        q, zeros = _gptq_unpack(qweight, bits, along_rows=True), _gptq_unpack(qzeros, bits, along_rows=False)
        zeros = (zeros + fmt.zero_offset) & ((1 << bits) - 1)  # v1's z - 1 wraps: a stored 2^bits - 1 is z = 0
    group = K if fmt.group == -1 else fmt.group
    if group is not None and -(-K // group) != groups:
        raise CamelidError(f"{source}: {name}: {groups} groups of scales, but group_size={fmt.group} over "
                           f"{K} inputs makes {-(-K // group)}")
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is None:
        g_idx = torch.arange(K) // (K // groups)
    elif g_idx.shape != (K,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise CamelidError(f"{source}: {name}.g_idx does not index {groups} groups for {K} inputs")
    return q, scales, zeros, g_idx.long()


def _gptq_unpack(packed: torch.Tensor, bits: int, along_rows: bool) -> torch.Tensor:
    """GPTQ's int32 words -> values: along_rows packs consecutive rows (qweight), else columns (qzeros)."""
    words = packed if along_rows else packed.t()
    u = words.to(torch.int64) & 0xFFFFFFFF
    if bits == 3:  # 32 values in a 96-bit little-endian stream over 3 words, some straddling two words
        w = u.reshape(-1, 3, u.shape[-1])
        bitsets = torch.stack([(w[:, i // 32] >> (i % 32)) & 1 for i in range(96)], dim=1)
        vals = (bitsets.reshape(w.shape[0], 32, 3, -1) * torch.tensor([1, 2, 4]).view(1, 1, 3, 1)).sum(2)
        values = vals.reshape(-1, u.shape[-1])
    else:
        per = 32 // bits
        shifts = torch.arange(per) * bits
        values = ((u.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)).reshape(-1, u.shape[-1])
    return values if along_rows else values.t()


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 words (rows, cols / 8) -> (rows, cols): each word's nibbles in the order 0 2 4 6 1 3 5 7."""
    u = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (u.unsqueeze(-1) >> (torch.arange(8) * 4)) & 15  # (rows, words, 8): the i-th nibble
    values = torch.empty_like(nibbles)
    values[..., list(_AWQ_ORDER)] = nibbles
    return values.reshape(packed.shape[0], -1)


# ---------------------------------------------------------------- writing GPTQModel's layout


def gptq_config(group: int, desc_act: bool = False) -> dict:
    """The quantization_config (and quantize_config.json) GPTQModel and AutoGPTQ write for such a checkpoint."""
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act, "sym": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
            "lm_head": False}


def gptq_tensors(sd: dict, cfg, group: int) -> dict:
    """camelid's state dict, its int4 layers (packed weight + scales_zeros, integer zero points) as GPTQ's
    qweight/qzeros/scales/g_idx and the rest in fp16, under transformers' names: fused layers (q/k/v, gate/up)
    split back into their modules exactly as their float weights would be."""
    from camelid.formats.hf import state_dict_to_hf
    from camelid.model.quant import unpack_int4

    quantized = sorted(k[:-len(".scales_zeros")] for k in sd if k.endswith(".scales_zeros"))
    rows, marks = [], {}
    for i, name in enumerate(quantized):
        q = unpack_int4(sd[f"{name}.weight"])
        scales, zero_points = sd[f"{name}.scales_zeros"].float().permute(2, 1, 0)  # (N, groups) each
        z = 8 - zero_points / scales
        # (zero points read from a GPTQ checkpoint come back integers up to the float rounding of s (8 - z) / s)
        if q.shape[1] // scales.shape[1] != group or (z - z.round()).abs().max() > 1e-3 or z.min() < -1e-3 \
                or z.max() > 15 + 1e-3 \
                or not torch.equal(scales, scales.half().float()):
            raise CamelidError(f"{name}: its int4 groups are not GPTQ's (fp16 scales, integer zero points, groups "
                               f"of {group}): quantize with --method gptq --format gptq")
        perm = sd.get(f"{name}.in_perm")  # act-order: back to the inputs' own order, each with its group
        position = torch.arange(q.shape[1]) if perm is None else torch.argsort(perm)
        rows.append((q[:, position], scales, z.round().long(), position // group))
        # which layer and row each row of a transformers module comes from, through the same renaming and splits
        marks[f"{name}.weight"] = torch.stack([torch.full((q.shape[0],), i), torch.arange(q.shape[0])], 1)
    plain = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in quantized or k.endswith(".bias")}
    out = {k: v.half() if v.is_floating_point() else v for k, v in state_dict_to_hf(plain, cfg).items()}
    for key, mark in state_dict_to_hf(marks, cfg).items():
        q, scales, z, g_idx = rows[int(mark[0, 0])]
        q, scales, z = (t[mark[:, 1]] for t in (q, scales, z))
        base = key[:-len(".weight")]
        out[f"{base}.qweight"] = _pack_int32(q.t())
        out[f"{base}.qzeros"] = _pack_int32((z - 1) & 15).t().contiguous()  # v1 stores z - 1, in 4 bits
        out[f"{base}.scales"] = scales.t().half().contiguous()
        out[f"{base}.g_idx"] = g_idx.to(torch.int32)
    return out


def _pack_int32(values: torch.Tensor) -> torch.Tensor:
    """4-bit values (rows, cols) -> (rows / 8, cols) int32 words, 8 consecutive rows a word, low bits first."""
    v = values.long().reshape(-1, 8, values.shape[1])
    words = (v << (torch.arange(8) * 4).view(1, 8, 1)).sum(1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
