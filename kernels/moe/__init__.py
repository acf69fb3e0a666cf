"""Grouped (ragged) matmul for mixture-of-experts layers.

``grouped_matmul(x_MK, w_EKN, group_sizes_E)`` multiplies each contiguous run of rows of ``x``
by its group's weight: the dropless MoE dispatch of MegaBlocks (Gale et al., arXiv:2211.15841)
with tokens sorted by expert. Implementations (``impl``):

  ``reference``  ``jax.lax.ragged_dot`` accumulating in float32 (``reference.py``): the oracle.
  ``xla``        the same ``ragged_dot``, as XLA compiles it: the baseline the kernels beat.
  ``pallas_tpu`` the Pallas Mosaic TPU kernels (``tpu.py``), on a TPU or with ``interpret``:
                 row tiles visited once per group they touch, rows of other groups masked;
                 backward through Pallas too (``dx`` by the same kernel with the weight read
                 transposed, ``dw`` by a transposed grouped matmul). ``block_sizes`` takes a
                 ``tpu.BlockSizes``. Not yet run on a TPU.
  ``pallas_gpu`` the Pallas Mosaic GPU kernel (``gpu.py``, Hopper), on a GPU or with
                 ``interpret``: one program per output tile pipelines its row tile's groups;
                 ``dx`` through the kernel, ``dw`` through XLA's ``ragged_dot`` transpose.
                 ``block_sizes`` takes a ``gpu.BlockSizes``.
  ``auto``       ``pallas_tpu`` on a TPU backend; ``pallas_gpu`` on a Hopper GPU for bfloat16
                 / float16 inputs (on an H100 it ran the forward 2.5x (Mixtral) and 10.9x
                 (64 fine-grained experts) faster than ``xla`` and ``ragged_dot``, and its
                 backward 1.4-1.8x faster than ``xla``'s; README, 2026-11-27); else ``xla``.

Example::

    out_MN = kernels.moe.grouped_matmul(x_MK, w_EKN, group_sizes_E)
    out_MN = kernels.moe.grouped_matmul(x_MK, w_EKN, group_sizes_E, impl="pallas_tpu",
                                        interpret=True)   # TPU interpret mode on CPU
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.moe import reference

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
_PALLAS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}  # impl -> backend, and its module


def _check(x_MK, w_EKN, group_sizes_E):
    if x_MK.ndim != 2 or w_EKN.ndim != 3:
        raise ValueError(
            f"grouped_matmul expects x [M, K] and w [E, K, N]; got x{tuple(x_MK.shape)} "
            f"and w{tuple(w_EKN.shape)}"
        )
    if x_MK.shape[1] != w_EKN.shape[1]:
        raise ValueError(
            f"contracting dims differ: x{tuple(x_MK.shape)} has K={x_MK.shape[1]}, "
            f"w{tuple(w_EKN.shape)} has K={w_EKN.shape[1]}"
        )
    if group_sizes_E.shape != (w_EKN.shape[0],):
        raise ValueError(
            f"group_sizes must have shape ({w_EKN.shape[0]},), one entry per group of w; "
            f"got {tuple(group_sizes_E.shape)}"
        )
    if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes_E.dtype}")


def _auto(dtype) -> str:
    from kernels.attention import _is_hopper

    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "pallas_gpu" if backend == "gpu" and half and _is_hopper() else "xla"


@functools.partial(jax.jit, static_argnames=("impl", "interpret", "block_sizes"))
def grouped_matmul(
    x_MK,
    w_EKN,
    group_sizes_E,
    *,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes=None,
):
    """Rows of ``x`` sorted by group, each multiplied by its group's weight.

    Args:
      x_MK: ``[M, K]`` rows sorted by group; rows past ``sum(group_sizes)`` give zeros.
      w_EKN: ``[E, K, N]`` one weight per group.
      group_sizes_E: ``[E]`` integer rows per group (zeros allowed), ``sum <= M``.
      impl: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"``
        (module docstring).
      interpret: run a Pallas path in interpret mode (CPU tests).
      block_sizes: the Pallas kernel's ``BlockSizes`` (``tpu.BlockSizes`` /
        ``gpu.BlockSizes``); default from the shapes.

    Returns:
      ``[M, N]`` in ``x``'s dtype, accumulated in float32.
    """
    _check(x_MK, w_EKN, group_sizes_E)
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_matmul impl {impl!r}; valid: {list(IMPLS)}")
    if impl == "auto":
        impl = _auto(jnp.result_type(x_MK.dtype, w_EKN.dtype))
    if impl in _PALLAS:
        backend = _PALLAS[impl]
        if jax.default_backend() != backend and not interpret:
            raise ValueError(
                f"impl={impl!r} needs a {backend.upper()} backend (running on "
                f"{jax.default_backend()!r}); pass interpret=True to run it on CPU, or use "
                "impl='xla'"
            )
        kernel = importlib.import_module(f"kernels.moe.{backend}")
        return kernel.grouped_matmul(
            x_MK, w_EKN, group_sizes_E, block_sizes=block_sizes, interpret=interpret
        )
    out = reference.grouped_matmul(x_MK, w_EKN, group_sizes_E, preferred_element_type=jnp.float32)
    return out.astype(x_MK.dtype)
