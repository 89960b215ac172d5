"""Builds and calls ggml_gemv.c: matmuls on GGUF's Q4_0 and Q8_0 blocks with int8 activations.

Compiled with the system's C compiler at first use, for this machine's CPU, into ~/.cache/camelid (a second
or two; the source's hash names the library, so an edit rebuilds it). Only where the CPU has AVX-512 VNNI;
elsewhere `available()` is False and camelid uses PyTorch's kernels, so nothing depends on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("ggml_gemv.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp",
         "-shared", "-fPIC"]
NEEDED_CPU_FLAGS = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "f16c", "fma"}
TYPES = {"Q4_0": 2, "Q8_0": 8}
Q4_0_SPLIT = 102  # Q4_0 rows repacked as [scales][nibbles] (see split_q4_0)
TYPE_IDS = {*TYPES.values(), Q4_0_SPLIT}
PROMPT_ROWS = 16  # above this many rows, expanding to bf16 beats integer dot products
_lib: list = []


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
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            pass
        cc = os.environ.get("CC", "cc")
        try:
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp.name], check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("the GGUF decode kernel did not build (%s); using PyTorch's kernels", exc)
            Path(tmp.name).unlink(missing_ok=True)
            return None
        os.replace(tmp.name, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.ggml_matmul.restype = ctypes.c_int
    lib.ggml_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.ggml_matmul_q4s.restype = ctypes.c_int
    lib.ggml_matmul_q4s.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int]
    lib.ggml_dequantize_bf16.restype = ctypes.c_int
    lib.ggml_dequantize_bf16.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_int]
    return lib


def available() -> bool:
    if not _lib:
        _lib.append(_build())
    return _lib[0] is not None


def matmul(ggml_type: int, blocks: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """x (M, K) @ the block rows' weights (ggml type id 2: Q4_0, 8: Q8_0) -> float32 (M, out_features); None
    when the kernel does not take the call (the caller falls back). A few rows (decode) go through the
    integer kernel; more (a prompt) through the weights expanded to bf16 and oneDNN's matrix product."""
    lib = _lib[0] if _lib else (_lib.append(_build()) or _lib[0])
    if lib is None or ggml_type not in TYPE_IDS or blocks.device.type != "cpu":
        return None
    if x.shape[0] > PROMPT_ROWS:
        w = torch.empty(out_features, x.shape[1], dtype=torch.bfloat16)
        if lib.ggml_dequantize_bf16(ggml_type, blocks.data_ptr(), out_features, x.shape[1], w.data_ptr(),
                                    torch.get_num_threads()) != 0:
            return None
        return torch.nn.functional.linear(x.to(torch.bfloat16), w).float()
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], out_features)
    if ggml_type == Q4_0_SPLIT:
        rc = lib.ggml_matmul_q4s(blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0],
                                 y.data_ptr(), torch.get_num_threads())
    else:
        rc = lib.ggml_matmul(ggml_type, blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0],
                             y.data_ptr(), torch.get_num_threads())
    return y if rc == 0 else None


def split_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 rows (N, nb * 18) -> [nb f16 scales][nb * 16 nibble bytes] per row, the layout the kernel reads
    four blocks at a time from (same size; `join_q4_0` undoes it)."""
    n = blocks.shape[0]
    b = blocks.view(n, -1, 18)
    return torch.cat((b[..., :2].reshape(n, -1), b[..., 2:].reshape(n, -1)), dim=1)


def join_q4_0(split: torch.Tensor) -> torch.Tensor:
    n, nb = split.shape[0], split.shape[1] // 18
    return torch.cat((split[:, :2 * nb].view(n, nb, 2), split[:, 2 * nb:].view(n, nb, 16)), dim=-1).view(n, -1)
