"""Quantized weights and matmuls: int8 / int4 / fp8 weight-only, and W8A8 with dynamic
per-row activation scales.

The storage format and the math are in ``reference.py`` (``QuantizedWeight``; symmetric absmax
scales per output column or per group of ``group_size`` rows). Implementations (``impl``):

  ``reference``  plain jnp, the weight dequantized to float32: the oracle.
  ``xla``        the weight dequantized to the dtype of ``x`` and one XLA matmul (what XLA
                 fuses by itself; the baseline the kernels beat).
  ``pallas_tpu`` the Pallas Mosaic TPU kernel (``tpu.py``), on a TPU or with ``interpret``:
                 weight tiles travel quantized and are dequantized in VMEM; W8A8 included;
                 grouped weights need ``group_size % 128 == 0``.
  ``pallas_gpu`` the Pallas Mosaic GPU kernel (``gpu.py``, Hopper), on a GPU or with
                 ``interpret``: weight-only (the dequantized tile is the wgmma's register
                 operand), and W8A8 with 8-bit wgmmas on a transposed weight (``gpu_w8a8.py``).
  ``auto``       ``pallas_gpu`` on a Hopper GPU for bfloat16 / float16 activations (per-column
                 scales or groups of a multiple of 128 rows): on an H100 it ran the decode
                 GEMM 16 x 8192 x 28672 in 0.55-0.74x the time of the bfloat16 XLA matmul
                 and W8A8 int8 at 8192^3 in 0.77-0.89x, where ``xla`` took 2.7x and 1.14x
                 (README, 2026-11-27); ``xla`` everywhere else (the TPU kernel has not run on
                 a TPU yet).

Example::

    qw = kernels.quant.quantize(w_KN, "int8")            # per output channel
    y_MN = kernels.quant.matmul(x_MK, qw)                 # weight-only
    y_MN = kernels.quant.matmul(x_MK, qw, activations="int8")   # W8A8
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.quant import reference
from kernels.quant.reference import (
    ACTIVATIONS,
    SCHEMES,
    QuantizedWeight,
    check_matmul,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
_PALLAS = {"pallas_tpu": ("tpu", "tpu"), "pallas_gpu": ("gpu", "gpu")}


def _auto(x_MK, qw: QuantizedWeight) -> str:
    from kernels.attention import _is_hopper

    grouped_ok = qw.group_size is None or qw.group_size % 128 == 0
    half = x_MK.dtype in (jnp.bfloat16, jnp.float16)
    if jax.default_backend() == "gpu" and half and grouped_ok and _is_hopper():
        return "pallas_gpu"
    return "xla"


__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "SCHEMES",
    "QuantizedWeight",
    "dequantize",
    "matmul",
    "pack_int4",
    "quantize",
    "unpack_int4",
]


@functools.partial(jax.jit, static_argnames=("activations", "impl", "interpret"))
def matmul(x_MK, qw: QuantizedWeight, *, activations=None, impl="auto", interpret=False):
    """``x @ dequantize(qw)`` up to accumulation error, ``[M, N]`` in the dtype of ``x``.

    Args:
      x_MK: float activations.
      qw: a ``QuantizedWeight`` of shape ``(K, N)`` (``kernels.quant.quantize``).
      activations: ``None`` (weight-only), or ``"int8"`` / ``"fp8"`` to quantize ``x`` per row
        with dynamic scales too (W8A8; needs a per-channel weight of the same scheme).
      impl: see the module docstring.
      interpret: run a Pallas path in interpret mode (CPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown quant matmul impl {impl!r}; valid: {list(IMPLS)}")
    check_matmul(x_MK, qw, activations)
    if impl == "auto":
        impl = _auto(x_MK, qw)
    if impl in ("xla", "reference"):
        return reference.matmul(x_MK, qw, activations=activations, precise=impl == "reference")
    backend, module = _PALLAS[impl]
    if jax.default_backend() != backend and not interpret:
        raise ValueError(
            f"impl={impl!r} needs a {backend.upper()} backend (running on "
            f"{jax.default_backend()!r}); pass interpret=True to run it on CPU, or use impl='xla'"
        )
    kernel = importlib.import_module(f"kernels.quant.{module}")
    return kernel.matmul(x_MK, qw, activations=activations, interpret=interpret)
