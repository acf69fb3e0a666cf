"""Rotary position embeddings (Su et al., arXiv:2104.09864) with Llama-3 frequency scaling.

The rotation pairs dimension ``i`` with ``i + H/2`` (the "rotate half" layout of the Llama
checkpoints), so Hugging Face weights load without permuting the q/k projections.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.configs import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """Inverse frequencies ``[H/2]`` (float32), with Llama-3 scaling when given."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None:
        wavelen = 2 * math.pi / inv_freq
        # Llama 3 (arXiv:2407.21783 §3.3): long wavelengths are slowed by `factor`, short ones
        # kept, and the band between interpolated in original_max_len / wavelength.
        ratio = scaling.original_max_len / wavelen
        t = (ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        t = np.clip(t, 0.0, 1.0)
        inv_freq = (1.0 - t) * inv_freq / scaling.factor + t * inv_freq
    return jnp.asarray(inv_freq, jnp.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq):
    """Rotate ``x`` by angle ``position * inv_freq``; computed in float32.

    ``inv_freq`` of ``F`` entries rotates the first ``2 F`` dimensions of each head and passes
    the rest through (partial rotary, e.g. RecurrentGemma's half: ``rope_frequencies(H // 2)``).
    """
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    rot = 2 * inv_freq.shape[-1]
    x, rest = x[..., :rot], x[..., rot:]
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BTNH.dtype)
