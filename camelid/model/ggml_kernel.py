"""Builds and calls ggml_gemv.c: matmuls on GGUF's Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, IQ4_NL and IQ4_XS blocks with int8
activations,
a whole LLaMA decode step on them (see fused_decode.py), and the load-time conversions into them (Q4 repacking,
K-quants to Q8_0 for mixed fused layers).

Compiled with the system's C compiler at first use, for this machine's CPU, into ~/.cache/camelid (a second
or two; the source's hash names the library, so an edit rebuilds it). Only where the CPU has AVX-512 VNNI;
elsewhere `available()` is False and camelid uses PyTorch's kernels, so nothing depends on it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import mmap
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("ggml_gemv.c")
# no fused multiply-add contraction: the load-time conversions are bit-exact with gguf's numpy
FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c",
         "-mfma", "-fopenmp", "-shared", "-fPIC"]
NEEDED_CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"}
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, IQ4_NL, IQ4_XS = 2, 3, 8, 12, 14, 20, 23  # ggml's type ids
TYPES = {"Q4_0": Q4_0, "Q8_0": Q8_0, "Q4_K": Q4_K, "Q6_K": Q6_K}  # run in the file's own layout
# Run repacked, each field of a row's blocks together (see split_rows); IQ4_NL and IQ4_XS only so
SPLIT = {Q4_0: 102, Q4_1: 103, IQ4_NL: 104, IQ4_XS: 105}
SPLIT_ONLY = {"IQ4_NL": IQ4_NL, "IQ4_XS": IQ4_XS}
# A block's fields in bytes: Q4_0 an fp16 scale and 16 bytes of nibbles, Q4_1 an fp16 min besides; IQ4_NL is
# laid out as Q4_0; an IQ4_XS block of 256 has its fp16 scale, 2 + 4 bytes of 6-bit sub-scales, 128 of nibbles.
FIELDS = {Q4_0: (2, 16), Q4_1: (2, 2, 16), IQ4_NL: (2, 16), IQ4_XS: (2, 2, 4, 128)}
BLOCK_BYTES = {t: sum(f) for t, f in FIELDS.items()}
BLOCK_VALUES = {Q4_0: 32, Q4_1: 32, IQ4_NL: 32, IQ4_XS: 256}
TYPE_IDS = {*TYPES.values(), *SPLIT.values()}
# From this many activation rows on, the panel kernel (ggml_gemm) beats the row kernel (ggml_matmul): its
# unpacking costs about a millisecond per 10M weights whatever the rows (measured on a 2-core AVX-512 CPU).
PANEL_ROWS = {Q8_0: 6, Q4_0: 12, Q4_K: 20, Q6_K: 20, **{t: 12 for t in SPLIT.values()}}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build() -> ctypes.CDLL | None:
    if os.environ.get("CAMELID_NO_C_KERNELS") or not NEEDED_CPU_FLAGS <= _cpu_flags():
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "camelid"
    lib_path = cache / f"ggml_gemv-{tag}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
                pass
            try:
                subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", tmp.name, "-lm"], check=True,
                               capture_output=True, timeout=120)
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
            os.replace(tmp.name, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as exc:  # no compiler, no writable cache, a broken library
        log.warning("the GGUF kernel is not available (%s); using PyTorch's kernels", exc)
        return None
    for entry in (lib.ggml_matmul, lib.ggml_gemm):
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.ggml_k_to_q8_0.restype = ctypes.c_int
    lib.ggml_k_to_q8_0.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int]
    lib.ggml_dequantize_rows.restype = ctypes.c_int
    lib.ggml_dequantize_rows.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p]
    lib.ggml_split_rows.restype = ctypes.c_int
    lib.ggml_split_rows.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int]
    lib.ggml_llama_decode.restype = ctypes.c_int
    lib.ggml_llama_decode.argtypes = [ctypes.POINTER(LlamaLayer), ctypes.c_int64, ctypes.POINTER(LlamaDims),
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(KVLayout), ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.POINTER(LlamaHead), ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel, compiled once per machine (cached on disk) and loaded on first use; None where it cannot be."""
    return _build()


def available() -> bool:
    return library() is not None


HUGE_PAGE = 2 << 20


def weight_buffer(rows: int, cols: int) -> torch.Tensor:
    """An empty uint8 (rows, cols) tensor for block rows the kernels stream through every token, backed by 2 MB
    pages where Linux gives them (transparent huge pages on request): a decode step sweeps every weight once,
    and over 4 KB pages its TLB misses cost about 5% of the read rate here. Only whole 2 MB pages inside the
    tensor are asked for, so it never takes more memory than torch.empty; elsewhere it is torch.empty."""
    size = rows * cols
    if size < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(rows, cols, dtype=torch.uint8)
    # private: a shared anonymous map is shmem, which follows another (usually off) huge-page setting
    area = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive as long as the tensor
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        area.madvise(mmap.MADV_HUGEPAGE, start, size // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages: small pages, same memory
        pass
    return whole[start:start + size].view(rows, cols)


def matmul(ggml_type: int, blocks: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """x (M, K) @ the block rows' weights (a ggml type id in TYPE_IDS) -> float32 (M, out_features); None when
    the kernel does not take the call (the caller falls back). A few rows (decode) go through the row kernel,
    more (a prompt) through the panel kernel (ggml_gemm): both int8 activations times the blocks' values."""
    lib = library()
    if lib is None or ggml_type not in TYPE_IDS or blocks.device.type != "cpu":
        return None
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], out_features)
    entry = lib.ggml_gemm if x.shape[0] >= PANEL_ROWS[ggml_type] else lib.ggml_matmul
    rc = entry(ggml_type, blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(),
               torch.get_num_threads())
    return y if rc == 0 else None


class LlamaLayer(ctypes.Structure):
    """One block's weights for `llama_decode` (ggml_gemv.c's llama_layer); a null pointer is a part the block
    does not have."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("attn_norm", "mlp_norm", "wqkv", "wo", "w_in", "w_out")] + \
               [(name, ctypes.c_int32) for name in ("qkv_type", "wo_type", "in_type", "out_type")] + \
               [(name, ctypes.c_void_p) for name in ("qkv_bias", "q_norm", "k_norm", "post_attn_norm",
                                                     "post_mlp_norm")] + \
               [("window", ctypes.c_int64), ("local_rope", ctypes.c_int32)] + \
               [(name, ctypes.c_int32) for name in ("n_experts", "n_used", "renorm", "expert_in_type",
                                                    "expert_out_type")] + \
               [("expert_ffn", ctypes.c_int64), ("router", ctypes.c_void_p), ("expert_in", ctypes.c_void_p),
                ("expert_out", ctypes.c_void_p), ("shared_ffn", ctypes.c_int64), ("shared_gate", ctypes.c_void_p),
                ("shared_in", ctypes.c_void_p), ("shared_out", ctypes.c_void_p), ("shared_in_type", ctypes.c_int32),
                ("shared_out_type", ctypes.c_int32)]


class LlamaDims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_len")] + \
               [(name, ctypes.c_float) for name in ("norm_eps", "attn_scale", "attn_softcap")] + \
               [("gelu", ctypes.c_int32)]


class KVLayout(ctypes.Structure):
    """Where a layer's cache keeps each position (ggml_gemv.c's kv_layout): a paged row's blocks, or one block."""
    _fields_ = [(name, ctypes.c_int64) for name in ("block_size", "block_stride", "pos_stride", "head_stride")] + \
               [("blocks", ctypes.c_void_p)]


class LlamaHead(ctypes.Structure):
    """The final norm and output layer for `llama_decode` (ggml_gemv.c's llama_head)."""
    _fields_ = [("norm", ctypes.c_void_p), ("w", ctypes.c_void_p), ("type", ctypes.c_int32),
                ("n_vocab", ctypes.c_int64)]


def llama_decode(layers, dims: LlamaDims, x: torch.Tensor, k_cache, v_cache, layout: KVLayout, pos: int,
                 cos: torch.Tensor,
                 sin: torch.Tensor, cos_local: torch.Tensor, sin_local: torch.Tensor, head: LlamaHead | None = None,
                 logits: torch.Tensor | None = None) -> bool:
    """Runs every block of one decode step on x (dim,) fp32 in place (see ggml_llama_decode), and with a head
    writes the logits (n_vocab,) fp32 too; False when the kernel does not take the call and x is untouched.
    k_cache/v_cache are ctypes arrays of the layers' fp32 cache pointers, laid out as `layout` says."""
    lib = library()
    if lib is None:
        return False
    return lib.ggml_llama_decode(layers, len(layers), ctypes.byref(dims), x.data_ptr(), k_cache, v_cache,
                                 ctypes.byref(layout), pos,
                                 cos.data_ptr(), sin.data_ptr(), cos_local.data_ptr(), sin_local.data_ptr(),
                                 None if head is None else ctypes.byref(head),
                                 None if logits is None else logits.data_ptr(), torch.get_num_threads()) == 0


def k_quant_to_q8_0(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor | None:
    """Q4_K (12) or Q6_K (14) block rows (N, K/256 * bytes) -> Q8_0 block rows (N, K/32 * 34), or None without
    the kernel."""
    if not available() or k % 256 or not blocks.is_contiguous():
        return None
    out = torch.empty(blocks.shape[0], k // 32 * 34, dtype=torch.uint8)
    rc = library().ggml_k_to_q8_0(ggml_type, blocks.data_ptr(), blocks.shape[0], k, out.data_ptr(),
                                torch.get_num_threads())
    return out if rc == 0 else None


def dequantize_rows(rows: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor | None:
    """Block rows as the file has them (Q4_0, Q8_0, Q4_K, Q6_K) -> float32 (N, k), or None where the kernel
    does not take them."""
    if not available() or not rows.is_contiguous() or rows.device.type != "cpu":
        return None
    out = torch.empty(rows.shape[0], k)
    failed = library().ggml_dequantize_rows(ggml_type, rows.data_ptr(), rows.shape[0], k, out.data_ptr())
    return None if failed else out


def split_rows(blocks: torch.Tensor, ggml_type: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_0, Q4_1, IQ4_NL or IQ4_XS block rows -> each field of a row's blocks together (per row all scales,
    [all mins,] then all nibble bytes): the layout the kernel reads four blocks at a time from (same size;
    `join_rows` undoes it). Written into `out` (contiguous rows of the same size) when given. Needs the kernel
    (`available()`)."""
    out = torch.empty_like(blocks) if out is None else out
    n, row_bytes = blocks.shape
    blocks = blocks.contiguous()
    nb = row_bytes // BLOCK_BYTES[ggml_type]
    if not available() or library().ggml_split_rows(ggml_type, blocks.data_ptr(), n, nb, out.data_ptr(),
                                                  torch.get_num_threads()) != 0:
        raise RuntimeError(f"the GGUF kernel cannot repack ggml type {ggml_type}")
    return out


def join_rows(split: torch.Tensor, ggml_type: int) -> torch.Tensor:
    n, nb = split.shape[0], split.shape[1] // BLOCK_BYTES[ggml_type]
    parts, at = [], 0
    for size in FIELDS[ggml_type]:
        parts.append(split[:, at * nb:(at + size) * nb].reshape(n, nb, size))
        at += size
    return torch.cat(parts, dim=-1).view(n, -1)
