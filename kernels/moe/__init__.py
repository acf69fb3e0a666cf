"""Grouped (ragged) matmul for mixture-of-experts layers.

``grouped_matmul(x_MK, w_EKN, group_sizes_E)`` multiplies each contiguous run of rows of ``x``
by its group's weight: the dropless MoE dispatch of MegaBlocks (Gale et al., arXiv:2211.15841)
with tokens sorted by expert. ``impl="reference"``/``"xla"`` is ``jax.lax.ragged_dot``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.moe import reference

IMPLS = ("auto", "reference", "xla")


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


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def grouped_matmul(x_MK, w_EKN, group_sizes_E, *, impl: str = "auto", interpret: bool = False):
    """Rows of ``x`` sorted by group, each multiplied by its group's weight.

    Args:
      x_MK: ``[M, K]`` rows sorted by group; rows past ``sum(group_sizes)`` give zeros.
      w_EKN: ``[E, K, N]`` one weight per group.
      group_sizes_E: ``[E]`` integer rows per group (zeros allowed), ``sum <= M``.
      impl: ``"auto"``, ``"reference"`` or ``"xla"``.
      interpret: run a Pallas path in interpret mode (CPU tests).

    Returns:
      ``[M, N]`` in ``x``'s dtype, accumulated in float32.
    """
    del interpret
    _check(x_MK, w_EKN, group_sizes_E)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {list(IMPLS)}")
    out = reference.grouped_matmul(x_MK, w_EKN, group_sizes_E, preferred_element_type=jnp.float32)
    return out.astype(x_MK.dtype)
