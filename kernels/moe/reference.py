"""Grouped matmul in plain jnp: the oracle and the ``xla`` path of ``kernels.moe``.

Rows of ``x_MK`` are sorted by group: group ``e`` owns rows ``[offset_e, offset_e + sizes_e)``
with ``offset_e = sum(sizes[:e])``. ``jax.lax.ragged_dot`` computes exactly this product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x_MK, w_EKN, group_sizes_E, *, preferred_element_type=None):
    """``out[m] = x[m] @ w[group(m)]``; rows past ``sum(group_sizes)`` are zero. ``[M, N]``."""
    out_dtype = preferred_element_type or x_MK.dtype
    return jax.lax.ragged_dot(
        x_MK, w_EKN, group_sizes_E.astype(jnp.int32), preferred_element_type=out_dtype
    )
