"""Weight-only quantized linear layers on PyTorch's packed CPU kernels.

- int8: one symmetric scale per output channel, `torch._weight_int8pack_mm`.
- int4: groups of 32/64/128/256 inputs, each with a scale and a float zero point, w = (q - 8) * scale + zero
  (the formula of `torch._weight_int4pack_mm_for_cpu`, which also covers GGUF's Q4_0, Q4_1 and Q4_K exactly).

On disk an int4 weight is (N, K/2) uint8, two 4-bit values per byte with the even input in the high nibble
(gpt-fast's layout); at load it is repacked once into the CPU kernel's tiled layout. Devices without a
kernel here dequantize on the fly, which is correct but slow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from camelid.errors import CamelidError
from camelid.model import ggml_kernel

INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only round-to-nearest quantization of a model's linear layers (see `layer_modes`)."""
    mode: str  # int8 or int4
    group: int = 32  # int4 group size
    output: str | None = None  # the output layer's mode: int8, int4 or float (default: see `output_mode`)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest, symmetric, per output channel: (int8 (N, K), fp32 scales (N,))."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest, asymmetric, per group of `group` inputs: (values 0..15 (N, K) uint8,
    scales (N, K/group), zeros (N, K/group)) with w ~ (q - 8) * scale + zero."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15)
    return q.reshape(N, K).to(torch.uint8), scales, lo + 8 * scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack(((packed >> 4) & 15, packed & 15), dim=-1).reshape(packed.shape[0], -1)


def pack_for_cpu_kernel(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) values 0..15 -> the tiled layout `_weight_int4pack_mm_for_cpu` reads, byte for byte what
    `_convert_weight_to_int4pack_for_cpu` makes, but from uint8 (that op wants int32: 8x the bytes and
    several seconds for a 1B model). Each block of rows stores, per input, row j and row j + block/2 in one
    byte; the block size depends on the CPU's vector width, so it is found once by probing torch's own packer."""
    N, K = q.shape
    block = kernel_block()
    if block is None or N % block:
        return torch._convert_weight_to_int4pack_for_cpu(q.int(), 2)
    qb = q.to(torch.uint8).view(N // block, 2, block // 2, K)
    return (qb[:, 0] | (qb[:, 1] << 4)).transpose(1, 2).contiguous().view(N, K // 2)


def unpack_from_cpu_kernel(packed: torch.Tensor) -> torch.Tensor | None:
    """The inverse of `pack_for_cpu_kernel`: q (N, K) values 0..15, or None where torch's own packer was used."""
    N, half = packed.shape
    block = kernel_block()
    if block is None or N % block:
        return None
    p = packed.view(N // block, 2 * half, block // 2).transpose(1, 2)
    return torch.stack((p & 15, p >> 4), dim=1).reshape(N, 2 * half)


_KERNEL_BLOCK: list[int | None] = []


def kernel_block() -> int | None:
    if not _KERNEL_BLOCK:
        probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        want = torch._convert_weight_to_int4pack_for_cpu(probe, 2)
        found = None
        for block in (64, 32, 16):
            qb = probe.to(torch.uint8).view(128 // block, 2, block // 2, 64)
            if torch.equal((qb[:, 0] | (qb[:, 1] << 4)).transpose(1, 2).reshape(128, 32), want):
                found = block
                break
        _KERNEL_BLOCK.append(found)
    return _KERNEL_BLOCK[0]


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    """The CPU kernel wants whole groups along the input and output channels in multiples of 16."""
    return in_features % group == 0 and out_features % 16 == 0 and in_features % 64 == 0


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """The CPU kernels are fast for bf16 activations only (fp32 runs 50-100x slower on a prompt), so fp32
    inputs are rounded to bf16 for the matmul; the int4/int8 weights are far coarser than that rounding.
    The bf16 int8 kernel reads past rows whose length is not a multiple of 16 (wrong sums or a crash in
    torch 2.13), so those go in fp32, bf16 ones (autocast, a bf16 model) included."""
    if x.shape[-1] % 16:
        x = x.float()
    elif x.dtype == torch.float32:
        x = x.to(torch.bfloat16)
    return _aligned(x.contiguous())


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels read in 16-byte vectors and crash on a tensor that starts between them, as a weight
    memory-mapped from a safetensors file may; a copy is freshly (64-byte) aligned."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _cached(layer: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A buffer in the activations' dtype, converted once rather than on every call."""
    tensor = getattr(layer, name)
    cache = layer.__dict__.setdefault("_dtype_cache", {})
    key = (name, dtype, tensor.data_ptr())
    if key not in cache:
        if len(cache) > 4:  # stale entries of buffers since replaced
            cache.clear()
        cache[key] = tensor.to(dtype)
    return cache[key]


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W^T for a frozen quantized W, with a backward (the packed kernels have none): dx = dy @ W, W
    dequantized again for the moment it is needed. Nothing but the layer is saved for backward, so a LoRA
    over a 4-bit base (QLoRA) never holds a float copy of a weight for longer than one layer's backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.layer.dequantize().to(device=dy.device, dtype=dy.dtype), None


def _quantized_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features)
    y = _FrozenQuantizedMatmul.apply(x2, layer) if x2.requires_grad else layer.matmul(x2)
    y = y.to(x.dtype).view(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        buffers = quantized_buffers(linear.weight.detach(), "int8", 0, linear.weight.dtype)
        layer.weight, layer.scales = buffers["weight"], buffers["scales"]
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_linear(self, x)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ W^T, without the bias."""
        if x2.device.type == "cpu":
            xk = _kernel_input(x2)
            return torch._weight_int8pack_mm(xk, self.weight, _cached(self, "scales", xk.dtype))
        return F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight = _aligned(self.weight)  # once, here: a memory-mapped weight may start off alignment

    def dequantize(self) -> torch.Tensor:
        return self.weight.float().mul_(self.scales.float()[:, None])


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group: int, bias: bool = False):
        super().__init__()
        if group not in INT4_GROUPS:
            raise CamelidError(f"int4 group size {group}: use one of {', '.join(map(str, INT4_GROUPS))}")
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # (K/group, N, 2): scale and zero, the kernel's own layout, so nothing is reshaped per token
        self.register_buffer("scales_zeros", torch.zeros(in_features // group, out_features, 2))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # an act-order GPTQ layer's input order: the weight's columns are the inputs in_perm[0], in_perm[1], ...
        self.register_buffer("in_perm", None)
        self.cpu_layout = False  # `weight` repacked in place for the CPU kernel (same shape), on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, group, linear.bias is not None)
        buffers = quantized_buffers(linear.weight.detach(), "int4", group, linear.weight.dtype)
        layer.weight, layer.scales_zeros = buffers["weight"], buffers["scales_zeros"]
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32):
        """q (N, K) values 0..15; scales and zeros (N, K/group)."""
        self.weight = pack_int4(q)
        self.scales_zeros = kernel_scales_zeros(scales, zeros, dtype)
        self.cpu_layout = False

    def prepare(self, packed: bool = False):
        """Once loaded: on a CPU, repack the weight into PyTorch's int4 kernel layout now rather than on the
        first token. `packed`: the loader already wrote it in that layout."""
        if packed:
            self.cpu_layout = True
        elif self.weight.device.type == "cpu":
            self.kernel_weight()

    def kernel_weight(self) -> torch.Tensor:
        if not self.cpu_layout:
            self.weight = pack_for_cpu_kernel(unpack_int4(self.weight))
            self.cpu_layout = True
        return self.weight

    def portable_weight(self) -> torch.Tensor:
        """The on-disk layout, recovered from the kernel's by running it on the identity matrix."""
        if not self.cpu_layout:
            return self.weight
        sz = self.scales_zeros.float()
        w = torch.cat([torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group, sz)
                       for eye in torch.eye(self.in_features).split(1024)]).t()
        scales, zeros = sz.permute(2, 1, 0)
        g = w.reshape(self.out_features, -1, self.group)
        q = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
        return pack_int4(q.reshape(self.out_features, self.in_features))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.portable_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:  # a partial load (a LoRA checkpoint's) leaves the packed weight be
            self.cpu_layout = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_linear(self, x)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ W^T, without the bias (an act-order layer first gathers its inputs in its weight's order)."""
        if self.in_perm is not None:
            x2 = x2.index_select(1, self.in_perm)
        if x2.device.type == "cpu":
            xk = _kernel_input(x2)
            return torch._weight_int4pack_mm_for_cpu(xk, self.kernel_weight(), self.group,
                                                     _cached(self, "scales_zeros", xk.dtype))
        return F.linear(x2, self._grouped_weight().to(x2.dtype))

    def dequantize(self) -> torch.Tensor:
        """The float weight, its columns in the inputs' order."""
        w = self._grouped_weight()
        if self.in_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.in_perm] = w
        return out

    def _grouped_weight(self) -> torch.Tensor:
        q = unpack_from_cpu_kernel(self.weight) if self.cpu_layout else None
        if q is None:
            q = unpack_int4(self.portable_weight())
        q = q.float().reshape(self.out_features, -1, self.group)
        scales, zeros = self.scales_zeros.float().permute(2, 1, 0)
        # in place: QLoRA dequantizes every frozen layer in each backward, and each temporary is a whole weight
        return q.sub_(8).mul_(scales[..., None]).add_(zeros[..., None]).reshape(self.out_features, self.in_features)


class GGMLEmbedding(nn.Module):
    """A token embedding kept in a GGUF file's own quantized blocks (one row of blocks per token): a lookup
    dequantizes only the rows it reads, as llama.cpp does, so the table costs its file size, not 4 bytes a
    weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int, row_bytes: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("blocks", torch.zeros(num_embeddings, row_bytes, dtype=torch.uint8))
        self.register_buffer("ggml_type", torch.tensor(ggml_type, dtype=torch.int32))
        self.out_dtype = torch.float32  # the model's compute dtype, set when the model is built

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[ids.reshape(-1).to(self.blocks.device)]
        out = ggml_kernel.dequantize_rows(rows, int(self.ggml_type), self.embedding_dim)
        if out is None:
            out = torch.from_numpy(quants.dequantize(rows.cpu().numpy(), GGMLQuantizationType(int(self.ggml_type))))
        return out.to(device=ids.device, dtype=self.out_dtype).view(*ids.shape, self.embedding_dim)


class GGMLLinear(nn.Module):
    """A matmul weight kept in GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, IQ4_NL or IQ4_XS), run by camelid's C kernel
    (ggml_gemv.c: int8 activations, AVX-512 VNNI), as llama.cpp runs it. Only built where that kernel is
    available; elsewhere the same file loads into Int4Linear/Int8Linear. Other devices dequantize per call."""

    def __init__(self, in_features: int, out_features: int, ggml_type: int, row_bytes: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("ggml_type", torch.tensor(ggml_type, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.split = False  # Q4_0/Q4_1 rows repacked for the kernel (ggml_kernel.split_rows)

    def prepare(self, packed: bool = False):
        """Once loaded: repack Q4_0/Q4_1 rows into the layout the CPU kernel reads fastest (same size).
        `packed`: the loader already wrote them in that layout."""
        if packed:
            self.split = True
        elif (not self.split and int(self.ggml_type) in ggml_kernel.SPLIT and self.in_features % 128 == 0
                and self.blocks.device.type == "cpu" and ggml_kernel.available()):
            self.blocks = ggml_kernel.split_rows(self.blocks, int(self.ggml_type),
                                                 ggml_kernel.weight_buffer(*self.blocks.shape))
            self.split = True

    def file_blocks(self) -> torch.Tensor:
        return ggml_kernel.join_rows(self.blocks, int(self.ggml_type)) if self.split else self.blocks

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "blocks"] = self.file_blocks()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "blocks" in state_dict:
            self.split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantized_linear(self, x)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) @ W^T, without the bias."""
        kind = ggml_kernel.SPLIT[int(self.ggml_type)] if self.split else int(self.ggml_type)
        y = ggml_kernel.matmul(kind, self.blocks, x2, self.out_features)
        return F.linear(x2, self.dequantize().to(device=x2.device, dtype=x2.dtype)) if y is None else y

    def dequantize(self) -> torch.Tensor:
        values = quants.dequantize(self.file_blocks().cpu().numpy(), GGMLQuantizationType(int(self.ggml_type)))
        return torch.from_numpy(values).to(self.blocks.device)


QUANTIZED = (Int8Linear, Int4Linear, GGMLLinear)


def prepare_layers(model: nn.Module, packed: frozenset[str] | set[str] = frozenset()):
    """Every quantized layer laid out for the kernel of the device it is on (see their `prepare`); `packed`
    names the layers a loader already wrote in that layout."""
    for name, module in model.named_modules():
        if isinstance(module, (Int4Linear, GGMLLinear)):
            module.prepare(name in packed)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, parent, attribute) of every matmul weight a quantizer may replace: the blocks' projections and
    the output layer (embeddings stay in float: a lookup reads one row a token; so do a mixture of experts'
    routers, as llama-quantize keeps them: a rounded score can send a token to another expert)."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, (nn.Linear, *QUANTIZED)) and attr not in ("embed_proj_in", "embed_proj_out",
                                                                             "router", "shared_gate"):
                found.append((f"{name}.{attr}" if name else attr, module, attr))
    return found


def quantize_model(model: nn.Module, mode: str, group: int = 32, output: str | None = None) -> dict[str, int]:
    """Replaces the float linear layers in place. Returns how many layers got each kind. `output` is the
    output layer's mode (default: int8 under int4, see `output_mode`)."""
    modes = layer_modes(model, mode, group, output)
    for name, parent, attr in linear_layers(model):
        if name in modes:
            layer = getattr(parent, attr)
            setattr(parent, attr, Int4Linear.from_linear(layer, group) if modes[name] == "int4"
                    else Int8Linear.from_linear(layer))
    return {kind: sum(m == kind for m in modes.values()) for kind in ("int8", "int4")}


def layer_modes(model: nn.Module, mode: str, group: int = 32, output: str | None = None) -> dict[str, str]:
    """Which float linear layers a quantizer turns into what: int4, or int8 (the int8 mode, the output layer
    under int4 by default, and shapes the int4 kernel cannot take). Works on a model on the meta device."""
    if mode not in ("int8", "int4"):
        raise CamelidError(f"quantization mode {mode!r}: use int8 or int4")
    output = output_mode(mode, output)
    modes = {}
    for name, parent, attr in linear_layers(model):
        layer = getattr(parent, attr)
        layer_mode = output if name == "output" else mode
        if not isinstance(layer, nn.Linear) or layer_mode == "float":
            continue
        fits = int4_fits(layer.out_features, layer.in_features, group)
        modes[name] = "int4" if layer_mode == "int4" and fits else "int8"
    return modes


def quantized_buffers(w: torch.Tensor, mode: str, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A float weight as an Int8Linear ("weight", "scales") or Int4Linear ("weight", "scales_zeros") holds
    it, scales in `dtype`: what loading a checkpoint straight into quantized layers needs. Rows go a few MB at
    a time, so the float temporaries stay small beside a big layer."""
    rows = max(1, (1 << 22) // w.shape[1])
    chunks = [quantize_int8(c) if mode == "int8" else quantize_int4(c, group) for c in w.split(rows)]
    if mode == "int8":
        q, scales = (torch.cat(parts) for parts in zip(*chunks))
        return {"weight": q, "scales": scales.to(dtype)}
    q, scales, zeros = (torch.cat(parts) for parts in zip(*chunks))
    return {"weight": pack_int4(q), "scales_zeros": kernel_scales_zeros(scales, zeros, dtype)}


def kernel_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/group) scales and zeros -> the int4 kernel's (K/group, N, 2)."""
    return torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous()


def output_mode(mode: str, output: str | None) -> str:
    """The output layer's mode: int8, int4 or float. Under int4 it keeps 8 bits by default, as llama.cpp's 4-bit
    files keep it at Q6_K: every logit goes through it, so its rounding costs the most perplexity per byte."""
    output = output or ("int8" if mode == "int4" else mode)
    if output not in ("int8", "int4", "float"):
        raise CamelidError(f"output layer mode {output!r}: use int8, int4 or float")
    if output == "int4" and mode == "int8":
        raise CamelidError("an int4 output layer needs --mode int4")
    return output


def quantized_shells(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Before loading a quantized checkpoint: swap in empty quantized layers wherever its tensors say so."""
    if "tok_embeddings.blocks" in tensors:
        emb = model.tok_embeddings
        model.tok_embeddings = GGMLEmbedding(emb.num_embeddings, emb.embedding_dim,
                                             int(tensors["tok_embeddings.ggml_type"]),
                                             tensors["tok_embeddings.blocks"].shape[1])
    for name, parent, attr in linear_layers(model):
        layer = getattr(parent, attr)
        bias = layer.bias is not None
        if f"{name}.blocks" in tensors:
            setattr(parent, attr, GGMLLinear(layer.in_features, layer.out_features, int(tensors[f"{name}.ggml_type"]),
                                             tensors[f"{name}.blocks"].shape[1], bias))
        elif f"{name}.scales_zeros" in tensors:
            groups = tensors[f"{name}.scales_zeros"].shape[0]
            int4 = Int4Linear(layer.in_features, layer.out_features, layer.in_features // groups, bias)
            if f"{name}.in_perm" in tensors:
                int4.in_perm = torch.zeros(layer.in_features, dtype=torch.long)
            setattr(parent, attr, int4)
        elif f"{name}.scales" in tensors:
            setattr(parent, attr, Int8Linear(layer.in_features, layer.out_features, bias))
