"""Decode state: what a model carries between calls when it generates token by token.

The design has three parts, so that every family fits without touching generation code:

``Segment``
  Describes the chunk of ``T`` tokens a call appends to each sequence: sequence ``b`` already
  holds ``starts[b]`` tokens and ends with ``lengths[b]`` after the call (``lengths - starts``
  valid tokens, right-padded to ``T``). Prefill of ragged prompts is ``starts = 0,
  lengths = prompt lengths``; a decode step is ``T = 1, lengths = starts + 1``; a full
  forward without state is ``starts = 0, lengths = T``. ``fresh`` (static) says
  ``starts == 0``, which lets attention skip reading the cache.

Per-layer state
  Each mixer defines its own state pytree and ``init_state(batch, max_len)``: a ``KVCache``
  for attention, a constant-size carry for a recurrent mixer, a ring buffer for local
  attention. A mixer's ``__call__(x_BTD, segment, state)`` returns ``(y_BTD, new_state)``;
  ``state is None`` means a stateless full forward. Padded positions (``t >= lengths - starts``)
  must leave the state as if they were absent.

``DecodeState``
  The model-level pytree: the per-sequence token count and the tuple of layer states (plus
  room for model-level extras such as early-exit bookkeeping). It is donated to the jitted
  step, so caches are updated in place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Segment:
    """The tokens appended by one call; see the module docstring."""

    starts_B: jax.Array
    lengths_B: jax.Array
    num_tokens: int = struct.field(pytree_node=False)
    fresh: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def full(cls, batch: int, num_tokens: int) -> Segment:
        """A stateless forward over ``num_tokens`` tokens at positions ``0..T-1``."""
        return cls(
            starts_B=jnp.zeros((batch,), jnp.int32),
            lengths_B=jnp.full((batch,), num_tokens, jnp.int32),
            num_tokens=num_tokens,
            fresh=True,
        )

    @property
    def positions_BT(self) -> jax.Array:
        return self.starts_B[:, None] + jnp.arange(self.num_tokens, dtype=jnp.int32)

    @property
    def valid_BT(self) -> jax.Array:
        """True at the real (non-padding) tokens of the chunk."""
        return self.positions_BT < self.lengths_B[:, None]


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer, ``[B, S, K, H]`` each.

    A float cache holds ``k_BSKH`` / ``v_BSKH`` in the compute dtype and no scales. An int8
    cache (``zeros(..., dtype=jnp.int8)``) holds int8 values and float32 scales ``[B, S, K]``,
    one per token and kv head: ``k = k_BSKH * k_scale_BSK[..., None]`` (symmetric absmax over
    ``H``, ``scale = absmax / 127``, 1.0 where the row is all zeros), about half the bytes of
    bfloat16 for ``H >> 4``.
    """

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    k_scale_BSK: jax.Array | None = None
    v_scale_BSK: jax.Array | None = None

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        """An empty cache; ``dtype=jnp.int8`` gives the quantized one."""
        shape = (batch, max_len, kv_heads, head_dim)
        if jnp.dtype(dtype) != jnp.int8:
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        ones = jnp.ones(shape[:3], jnp.float32)
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), ones, ones)

    @property
    def quantized(self) -> bool:
        return self.k_scale_BSK is not None

    @property
    def dtype(self):
        return self.k_BSKH.dtype

    def write(self, k_BTKH, v_BTKH, segment: Segment) -> KVCache:
        """Store the chunk at positions ``starts[b] + t``; writes past the end are dropped.

        An int8 cache quantizes the chunk first and stores values and scales alike.
        """
        if self.quantized:
            (k_BTKH, ks_BTK), (v_BTKH, vs_BTK) = quantize_kv(k_BTKH), quantize_kv(v_BTKH)
            new = (k_BTKH, v_BTKH, ks_BTK, vs_BTK)
        else:
            new = (k_BTKH, v_BTKH)
        old = (self.k_BSKH, self.v_BSKH, self.k_scale_BSK, self.v_scale_BSK)[: len(new)]
        B, T = k_BTKH.shape[:2]
        if segment.fresh and self.k_BSKH.shape[1] >= T:
            # Positions 0..T-1 for every row: a contiguous slice write, cheaper than a scatter.
            out = [
                jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), 0, 1)
                for c, x in zip(old, new, strict=True)
            ]
        elif T == 1:
            out = [_write_one(c, x, segment.starts_B) for c, x in zip(old, new, strict=True)]
        else:
            b_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
            pos_BT = segment.positions_BT
            out = [
                c.at[b_BT, pos_BT].set(x.astype(c.dtype), mode="drop")
                for c, x in zip(old, new, strict=True)
            ]
        return KVCache(*out)

    def dequantized(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """``(k_BSKH, v_BSKH)`` as float ``dtype`` (a cast for a float cache)."""
        if not self.quantized:
            return self.k_BSKH.astype(dtype), self.v_BSKH.astype(dtype)
        return (
            dequantize_kv(self.k_BSKH, self.k_scale_BSK, dtype),
            dequantize_kv(self.v_BSKH, self.v_scale_BSK, dtype),
        )


def quantize_kv(x_BTKH) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 over the last axis: ``(int8 [B, T, K, H], float32 scales [B, T, K])``."""
    x_BTKH = x_BTKH.astype(jnp.float32)
    absmax_BTK = jnp.max(jnp.abs(x_BTKH), axis=-1)
    scale_BTK = jnp.where(absmax_BTK > 0, absmax_BTK / 127.0, 1.0)
    q_BTKH = jnp.clip(jnp.round(x_BTKH / scale_BTK[..., None]), -127, 127).astype(jnp.int8)
    return q_BTKH, scale_BTK


def dequantize_kv(q_BSKH, scale_BSK, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` in float32, cast to ``dtype``."""
    return (q_BSKH.astype(jnp.float32) * scale_BSK[..., None].astype(jnp.float32)).astype(dtype)


def _write_one(cache_BSKH, new_B1KH, starts_B):
    """Row ``b`` of ``new`` into position ``starts[b]`` (dropped past the end).

    A vmapped dynamic update: a scatter whose batch dimension is explicit, so a cache split
    by batch over devices updates in place without gathering indices or updates.
    """

    def row(cache_SKH, new_1KH, start):  # also [S, K] / [1, K] rows of scales
        S = cache_SKH.shape[0]
        at = jnp.minimum(start, S - 1)
        old_1KH = jax.lax.dynamic_slice_in_dim(cache_SKH, at, 1, 0)
        new_1KH = jnp.where(start < S, new_1KH.astype(cache_SKH.dtype), old_1KH)
        return jax.lax.dynamic_update_slice_in_dim(cache_SKH, new_1KH, at, 0)

    return jax.vmap(row)(cache_BSKH, new_B1KH, starts_B)


@struct.dataclass
class DecodeState:
    """Model-level decode state: token counts and one state per layer."""

    lengths_B: jax.Array
    layers: tuple[Any, ...]
    extras: dict[str, Any] = struct.field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.lengths_B.shape[0]


def state_bytes(tree) -> int:
    """Bytes held by the arrays of a state pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
