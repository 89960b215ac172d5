"""Running llama.cpp's GGUF files (every family in `camelid/families/` with a GGUF layout): config, tokenizer and
weights all come from the file. Each family's metadata keys and tensor names are in its module there.

Weights map onto camelid's layers as directly as the kernels allow (docs/gguf-and-kernels.md):
- F32/F16/BF16 stay float (a zero-copy view when the dtype matches).
- Where camelid's C kernel runs (AVX-512 VNNI: int8 activations, as llama.cpp computes them), Q4_0, Q8_0,
  Q4_K, Q6_K, IQ4_NL and IQ4_XS stay in their blocks (Q4_0 and the IQ4s' rows repacked for the kernel), and
  Q4_1 is repacked too.
- Elsewhere Q4_0, Q4_1 and Q4_K become int4 groups of 32, exactly (`_weight_int4pack_mm_for_cpu`).
- The other types (Q5_0, Q5_1, Q5_K, Q2_K, Q3_K, the other i-quants, TQ1_0, TQ2_0, MXFP4) are decoded by gguf's
  own dequantization and re-quantized to Q8_0 blocks for the C kernel, or where it does not run, to int8
  per output channel (`_weight_int8pack_mm`), which is coarser where the file's block scales vary along a row
  (docs/gguf-and-kernels.md gives the measured error).
- A fused camelid layer (QKV, gate+up) whose parts have different types takes Q8_0 (or int8).
- A quantized token embedding stays in the file's blocks; rows are dequantized as they are looked up.

llama.cpp stores LLaMA's q and k rows in Meta's interleaved-RoPE order; they are put back into the
Hugging Face order camelid uses (a row permutation, so quantized rows move as they are).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from camelid.errors import CamelidError
from camelid.families import GGUF_ARCHS, family
from camelid.families.spec import GGUFPart, moe_parts
from camelid.formats.gguf_blocks import INT4_TYPES, dequantize, int4_groups, quantize_q8_0
from camelid.formats.gguf_file import GGML_TYPE_IDS, GGUFFile, GGUFTensor
from camelid.model import ggml_kernel
from camelid.model.config import ModelConfig
from camelid.model.quant import int4_fits, kernel_block, pack_for_cpu_kernel, pack_int4, quantize_int8, unpack_int4
from camelid.model.t5 import T5
from camelid.model.transformer import Transformer

FLOAT_TYPES = ("F32", "F16", "BF16")


def _key(meta: dict, source: str, key: str, kind=int, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise CamelidError(f"{source}: metadata key {key!r} is missing")
    value = meta[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
        isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise CamelidError(f"{source}: metadata key {key!r} should be {kind.__name__}, got {value!r}")
    if kind is int and value <= 0:  # every integer the config reads is a size or a count
        raise CamelidError(f"{source}: metadata key {key!r} should be a positive integer, got {value}")
    return kind(value)


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    meta, src = gf.metadata, str(gf.path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CamelidError(f"{src}: general.architecture={arch!r} is not supported ({', '.join(GGUF_ARCHS)})")
    if "token_embd.weight" not in gf.tensors:
        raise CamelidError(f"{src}: tensor 'token_embd.weight' is missing")

    def key(name: str, kind=int, default=None):
        return _key(meta, src, f"{arch}.{name}", kind, default)

    def floats(name: str) -> np.ndarray:
        t = gf.tensors[name]
        return dequantize(t.data, t.type, (-1,))

    layout = GGUF_ARCHS[arch].gguf
    sizes = _sizes(gf, key, arch) if layout.parts is None else {}
    fields = {**sizes, **layout.config(gf, key, floats)}
    try:
        return ModelConfig(**fields)
    except CamelidError as exc:
        raise CamelidError(f"{src}: {exc}") from None


def _sizes(gf: GGUFFile, key, arch: str) -> dict:
    """The sizes every architecture's metadata gives, checked against the tensors before anything is built."""
    src = str(gf.path)
    n_heads, dim = key("attention.head_count"), key("embedding_length")
    n_layers, ffn_dim = key("block_count"), key("feed_forward_length")
    max_seq_len = key("context_length", default=2048)
    embd = gf.tensors["token_embd.weight"]
    down = gf.tensors.get(f"blk.{n_layers - 1}.ffn_down.weight")
    experts, hidden = _experts(gf, key, arch, ffn_dim), ffn_dim
    if experts and down is None:  # every block a mixture of experts
        down, hidden = gf.tensors.get(f"blk.{n_layers - 1}.ffn_down_exps.weight"), experts["expert_ffn_dim"]
    positions = gf.tensors.get("position_embd.weight")
    if embd.shape[-1] != dim or n_heads > dim or down is None or hidden not in down.shape \
            or len(down.shape) != (3 if down.name.endswith("_exps.weight") else 2) \
            or (positions is not None and max_seq_len > positions.shape[0]):
        raise CamelidError(f"{src}: the metadata's sizes (embedding_length={dim}, block_count={n_layers}, "
                           f"feed_forward_length={ffn_dim}) do not match the file's tensors")
    head_dim = key("attention.key_length", default=max(dim // n_heads, 1))
    rope_dim = key("rope.dimension_count", default=head_dim)
    if rope_dim > head_dim or rope_dim % 2:
        raise CamelidError(f"{src}: {arch}.rope.dimension_count={rope_dim} does not fit heads of {head_dim}")
    n_kv_heads = key("attention.head_count_kv", default=n_heads)
    if n_heads % n_kv_heads:
        raise CamelidError(f"{src}: {arch}.attention.head_count_kv={n_kv_heads} does not divide "
                           f"head_count={n_heads}")
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=ffn_dim, max_seq_len=max_seq_len,
                vocab_size=embd.shape[0], tie_embeddings="output.weight" not in gf.tensors, head_dim=head_dim,
                rotary_pct=rope_dim / head_dim, n_kv_heads=n_kv_heads,
                rope_theta=key("rope.freq_base", float, 10000.0), **experts)


def _experts(gf: GGUFFile, key, arch: str, ffn_dim: int) -> dict:
    """A mixture of experts' sizes: the same keys in every architecture."""
    if f"{arch}.expert_count" not in gf.metadata:
        return {}
    n, used = key("expert_count"), key("expert_used_count")
    if used > n:
        raise CamelidError(f"{gf.path}: {arch}.expert_used_count={used} is more than expert_count={n}")
    fields = dict(n_experts=n, n_experts_used=used, expert_ffn_dim=key("expert_feed_forward_length", default=ffn_dim))
    if "blk.0.ffn_gate_inp_shexp.weight" in gf.tensors:
        fields["shared_expert_dim"] = key("expert_shared_feed_forward_length", default=ffn_dim)
    return fields


def _unpermute(raw: np.ndarray, heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> Hugging Face's half-split rows (the inverse of llama.cpp's permute)."""
    rows = raw.shape[0]
    return raw.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)


def layer_parts(cfg: ModelConfig, i: int) -> dict[str, list[GGUFPart]]:
    """camelid tensor of block i -> the GGUF tensors whose rows it concatenates."""
    parts = family(cfg.arch).gguf.layer_parts(cfg)
    if cfg.moe(i):  # the experts in place of the dense MLP
        parts = {k: v for k, v in parts.items() if not k.startswith(("mlp.w_in.", "mlp.w_out."))} | moe_parts(cfg)
    return {f"layers.{i}.{ours}": [p._replace(name=p.name.format(i=i)) for p in ps] for ours, ps in parts.items()}


def model_parts(cfg: ModelConfig, has_output: bool) -> dict[str, list[GGUFPart]]:
    """Every camelid tensor -> the GGUF tensors whose rows it concatenates."""
    whole = family(cfg.arch).gguf.parts
    if whole is not None:
        return whole(cfg, has_output)
    parts = global_parts(cfg, has_output)
    for i in range(cfg.n_layers):
        parts.update(layer_parts(cfg, i))
    return parts


def global_parts(cfg: ModelConfig, has_output: bool) -> dict[str, list[GGUFPart]]:
    parts = {"tok_embeddings.weight": [GGUFPart("token_embd.weight")], "norm.weight": [GGUFPart("output_norm.weight")]}
    if cfg.positions == "learned":
        parts["pos_embeddings.weight"] = [GGUFPart("position_embd.weight")]
    if cfg.norm == "layernorm":
        parts["norm.bias"] = [GGUFPart("output_norm.bias")]
    if cfg.embed_norm:
        parts.update({f"embed_norm.{p}": [GGUFPart(f"token_embd_norm.{p}")] for p in ("weight", "bias")})
    if has_output:
        parts["output.weight"] = [GGUFPart("output.weight")]
    return parts


def state_dict_from_gguf(gf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                         cpu_kernel: bool = False) -> tuple[dict[str, torch.Tensor], set[str]]:
    """camelid's tensors, and the int4 layers among them already in the CPU kernel's layout (`cpu_kernel`:
    packed straight from the file's blocks, skipping the portable layout a camelid folder stores)."""
    parts = model_parts(cfg, "output.weight" in gf.tensors and not cfg.tie_embeddings)
    norm_offset = family(cfg.arch).gguf.norm_offset
    with torch.device("meta"):
        shell = (T5 if cfg.n_encoder_layers else Transformer)(cfg)
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    # tables that are looked up rather than multiplied (positions, T5's relative biases) stay float
    tables = {f"{n}.weight" for n, m in shell.named_modules() if isinstance(m, torch.nn.Embedding)}
    sd: dict[str, torch.Tensor] = {}
    used = set()
    for ours, sources in parts.items():
        found = [(_part(gf.tensors.get(p.name), p, expected.get(ours)), p.heads(cfg) if p.heads else None)
                 for p in sources]
        if any(t is None for t, _ in found):
            missing = next(p.name for p, (t, _) in zip(sources, found) if t is None)
            if ours.endswith(".bias") and all(t is None for t, _ in found):
                continue  # the config's biases are checked against the model when it is built
            raise CamelidError(f"{gf.path}: tensor {missing!r} is missing")
        _check_shapes(gf, found, expected.get(ours))
        used.update(p.name for p in sources)
        base = ours.rsplit(".", 1)[0]
        if ours == "tok_embeddings.weight":
            sd.update(_embedding(found[0][0], dtype))
            if cfg.tie_embeddings and "tok_embeddings.blocks" in sd:  # the output layer needs its own copy
                sd.update({f"output.{k}": v for k, v in _linear(found, dtype, cpu_kernel).items()})
        elif ours.endswith(("router.weight", "shared_gate.weight")) or ours in tables:  # float, as in llama.cpp
            sd[ours] = torch.cat([dequantize(t.data, t.type, t.shape) for t, _ in found]).to(dtype)
        elif len(found[0][0].shape) == 1:  # norms and biases (a fused bias from its parts)
            t = torch.cat([dequantize(t.data, t.type, t.shape) for t, _ in found])
            sd[ours] = (t - norm_offset if ours.endswith("norm.weight") else t).to(dtype)
        else:
            sd.update({f"{base}.{k}": v for k, v in _linear(found, dtype, cpu_kernel).items()})
        for t, _ in found:
            gf.release(t)
    config_tensors = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    if cfg.tie_embeddings:  # a copy of the embedding table (T5's tied output, as its checkpoints saved it)
        config_tensors.add("output.weight")
    extra = sorted(set(gf.tensors) - used - config_tensors)
    if extra:
        raise CamelidError(f"{gf.path}: tensor {extra[0]!r} is not part of a {cfg.arch} model camelid runs")
    packed = {k.rsplit(".", 1)[0] for k in sd if k.endswith("scales_zeros")} if cpu_kernel else set()
    for key in [k for k in sd if k.endswith(".split_blocks")]:
        name = key.rsplit(".", 1)[0]
        sd[f"{name}.blocks"] = sd.pop(key)
        packed.add(name)
    return sd, packed


def _part(t: GGUFTensor | None, part: GGUFPart, want: tuple[int, ...] | None) -> GGUFTensor | None:
    """The tensor a part names: one expert's slice of a 3-D tensor, and a vector as the (1, n) matrix it is
    in camelid (a shared expert's gate)."""
    if t is None:
        return None
    if part.expert is not None:
        if len(t.shape) != 3 or part.expert >= t.shape[0]:
            return t  # refused by the shape check, naming the tensor
        rows = t.data.shape[0] // t.shape[0]
        data = t.data[part.expert * rows:(part.expert + 1) * rows]
        return GGUFTensor(t.name, t.type, t.shape[1:], data, t.offset + part.expert * data.nbytes)
    if len(t.shape) == 1 and want is not None and len(want) == 2 and want[0] == 1:
        return GGUFTensor(t.name, t.type, (1, t.shape[0]), t.data.reshape(1, -1), t.offset)
    return t


def _check_shapes(gf: GGUFFile, found, want: tuple[int, ...] | None):
    """Parts must stack into the layer's shape (and permute by head) before their bytes are touched."""
    rows = sum(t.shape[0] for t, _ in found)
    for t, heads in found:
        if want is None or len(t.shape) != len(want) or t.shape[1:] != want[1:] or rows != want[0] \
                or (heads and t.shape[0] % (2 * heads)):
            raise CamelidError(f"{gf.path}: tensor {t.name!r} has shape {t.shape}, which does not fit the "
                               f"model its metadata describes")


def _embedding(t: GGUFTensor, dtype) -> dict[str, torch.Tensor]:
    if t.type in FLOAT_TYPES:
        return {"tok_embeddings.weight": dequantize(t.data, t.type, t.shape).to(dtype)}
    with warnings.catch_warnings():  # a read-only view of the file: lookups only read it, and only the rows
        warnings.simplefilter("ignore", UserWarning)  # they need become resident
        blocks = torch.from_numpy(t.data)
    return {"tok_embeddings.blocks": blocks,
            "tok_embeddings.ggml_type": torch.tensor(GGML_TYPE_IDS[t.type], dtype=torch.int32)}


def _ggml_blocks(parts: list[torch.Tensor], type_id: int) -> dict[str, torch.Tensor]:
    """One layer's block rows for GGMLLinear, copied once: Q4_0/Q4_1 rows straight into the layout the kernel
    reads (the layer is then marked so), rather than repacked after loading in a second copy."""
    blocks = ggml_kernel.weight_buffer(sum(p.shape[0] for p in parts), parts[0].shape[1])
    split = type_id in ggml_kernel.SPLIT and parts[0].shape[1] // ggml_kernel.BLOCK_BYTES[type_id] * \
        ggml_kernel.BLOCK_VALUES[type_id] % 128 == 0
    row = 0
    for p in parts:  # part by part, so Q4 parts split alone, each into its rows of the layer
        if split:
            ggml_kernel.split_rows(p, type_id, blocks[row:row + p.shape[0]])
        else:
            blocks[row:row + p.shape[0]] = p
        row += p.shape[0]
    return {"ggml_type": torch.tensor(type_id, dtype=torch.int32), "split_blocks" if split else "blocks": blocks}


def _q8_0_rows(raw: np.ndarray, ggml_type: str, k: int) -> torch.Tensor:
    """Block rows of any type -> Q8_0 block rows: Q4_K and Q6_K (Q4_K_M's mixed q/k/v) in C, the rest through
    float in slices of rows, so converting never holds a whole float layer."""
    if ggml_type in ("Q4_K", "Q6_K"):
        with warnings.catch_warnings():  # a read-only view of the file: the kernel only reads it
            warnings.simplefilter("ignore", UserWarning)
            blocks = ggml_kernel.k_quant_to_q8_0(torch.from_numpy(np.ascontiguousarray(raw)),
                                                 GGML_TYPE_IDS[ggml_type], k)
        if blocks is not None:
            return blocks
    return torch.cat([quantize_q8_0(dequantize(raw[s:s + 1024], ggml_type, (-1, k)))
                      for s in range(0, raw.shape[0], 1024)])


def _linear(found: list[tuple[GGUFTensor, int | None]], dtype, cpu_kernel: bool) -> dict[str, torch.Tensor]:
    """The parts of one camelid matmul weight -> its tensors: float `weight`; GGUF `blocks` for the C kernel
    (Q4_0/Q8_0/Q4_K/Q6_K as they are, Q4_1 repacked, the rest as Q8_0); or, where that kernel does not run, int4
    `weight` + `scales_zeros` (in PyTorch's CPU layout when `cpu_kernel`) or int8 `weight` + `scales`. One
    part at a time, and re-quantization in slices of rows, so converting never holds a whole float layer."""
    raws = [(_unpermute(t.data, heads) if heads else t.data, t) for t, heads in found]
    types = {t.type for t, _ in found}
    n = sum(t.shape[0] for t, _ in found)
    k = found[0][0].shape[-1]
    if types <= set(FLOAT_TYPES):
        return {"weight": torch.cat([dequantize(raw, t.type, (-1, k)) for raw, t in raws]).to(dtype)}
    splits = len(types) == 1 and types <= set(ggml_kernel.SPLIT_ONLY) and k % 128 == 0
    if cpu_kernel and len(types) == 1 and (types <= set(ggml_kernel.TYPES) or splits) and ggml_kernel.available():
        with warnings.catch_warnings():  # read-only views of the file, copied below, so its pages can go
            warnings.simplefilter("ignore", UserWarning)
            rows = [torch.from_numpy(raw) for raw, _ in raws]
        return _ggml_blocks(rows, GGML_TYPE_IDS[found[0][0].type])
    if cpu_kernel and types == {"Q4_1"} and k % 128 == 0 and ggml_kernel.available():
        # as Q4_1 blocks (w = d * q + m per 32), for the kernel's repacked rows
        blocks = []
        for raw, t in raws:
            q, scales, zeros = int4_groups(raw, t.type)
            q = q.view(q.shape[0], -1, 32)
            head = torch.stack((scales, zeros - 8 * scales), dim=-1).to(torch.float16).view(torch.uint8)
            blocks.append(torch.cat((head, q[..., :16] | (q[..., 16:] << 4)), dim=-1).reshape(q.shape[0], -1))
        return _ggml_blocks(blocks, GGML_TYPE_IDS["Q4_1"])
    if len(types) == 1 and types <= set(INT4_TYPES) and int4_fits(n, k, 32):
        groups = [int4_groups(raw, t.type) for raw, t in raws]
        sz = torch.cat([torch.stack((s.t(), z.t()), dim=-1).to(torch.bfloat16) for _, s, z in groups], dim=1)
        block = kernel_block()
        if cpu_kernel and block and all(t.shape[0] % block == 0 for t, _ in found):
            # the kernel's layout is made of independent blocks of rows: parts pack on their own
            weight = torch.cat([pack_for_cpu_kernel(q) for q, _, _ in groups])
        else:
            weight = pack_int4(torch.cat([q for q, _, _ in groups]))
            if cpu_kernel:
                weight = pack_for_cpu_kernel(unpack_int4(weight))
        return {"weight": weight, "scales_zeros": sz.contiguous()}
    if cpu_kernel and ggml_kernel.available():  # re-quantized to Q8_0 blocks for the C kernel
        return _ggml_blocks([_q8_0_rows(raw, t.type, k) for raw, t in raws], GGML_TYPE_IDS["Q8_0"])
    weight, scales, row = torch.empty(n, k, dtype=torch.int8), torch.empty(n), 0
    for raw, t in raws:
        for start in range(0, raw.shape[0], 1024):
            w8, s8 = quantize_int8(dequantize(raw[start:start + 1024], t.type, (-1, k)))
            weight[row:row + len(w8)], scales[row:row + len(w8)] = w8, s8
            row += len(w8)
    return {"weight": weight, "scales": scales.to(dtype)}
