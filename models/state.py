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
    """Keys and values of one attention layer, ``[B, S, K, H]`` each."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k_BTKH, v_BTKH, segment: Segment) -> KVCache:
        """Store the chunk at positions ``starts[b] + t``; writes past the end are dropped."""
        B, T = k_BTKH.shape[:2]
        if segment.fresh and self.k_BSKH.shape[1] >= T:
            # Positions 0..T-1 for every row: a contiguous slice write, cheaper than a scatter.
            k = jax.lax.dynamic_update_slice_in_dim(self.k_BSKH, k_BTKH.astype(self.dtype), 0, 1)
            v = jax.lax.dynamic_update_slice_in_dim(self.v_BSKH, v_BTKH.astype(self.dtype), 0, 1)
            return KVCache(k, v)
        if T == 1:
            return KVCache(_write_one(self.k_BSKH, k_BTKH, segment.starts_B),
                           _write_one(self.v_BSKH, v_BTKH, segment.starts_B))  # fmt: skip
        b_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        pos_BT = segment.positions_BT
        k = self.k_BSKH.at[b_BT, pos_BT].set(k_BTKH.astype(self.dtype), mode="drop")
        v = self.v_BSKH.at[b_BT, pos_BT].set(v_BTKH.astype(self.dtype), mode="drop")
        return KVCache(k, v)

    @property
    def dtype(self):
        return self.k_BSKH.dtype


def _write_one(cache_BSKH, new_B1KH, starts_B):
    """Row ``b`` of ``new`` into position ``starts[b]`` (dropped past the end).

    A vmapped dynamic update: a scatter whose batch dimension is explicit, so a cache split
    by batch over devices updates in place without gathering indices or updates.
    """

    def row(cache_SKH, new_1KH, start):
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
