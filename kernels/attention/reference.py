"""Plain-jnp attention: the oracle every other path is tested against, and the ``xla`` path.

One masked-attention routine serves all three public ops: each query carries its absolute
position, each sequence a count of valid keys. ``precise=True`` (the ``reference`` impl) does
everything in float32; ``precise=False`` (the ``xla`` impl) keeps the matmul inputs in their
dtype with float32 accumulation and a float32 softmax. K/V heads are never repeated: queries
are grouped as ``[B, T, K, G, H]`` with ``G = N // K``.
"""

from __future__ import annotations

import jax.numpy as jnp


def key_mask(q_pos_BT, kv_len_B, num_keys, *, causal, sliding_window):
    """Boolean ``[B, T, S]``: which keys each query may see.

    Keys sit at positions ``0..S-1``; key ``s`` is visible to a query at position ``p`` of
    sequence ``b`` iff ``s < kv_len[b]``, ``s <= p`` when causal, and ``s > p - w`` with a
    sliding window ``w``.
    """
    s_S = jnp.arange(num_keys, dtype=jnp.int32)
    p_BT1 = q_pos_BT[:, :, None]
    mask = s_S[None, None, :] < kv_len_B[:, None, None]
    if causal:
        mask &= s_S[None, None, :] <= p_BT1
    if sliding_window is not None:
        mask &= s_S[None, None, :] > p_BT1 - sliding_window
    return mask


def masked_attention(
    q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_len_B, *, causal, sliding_window, softcap, scale, precise
):
    """Softmax attention with per-query positions and per-sequence key counts.

    Rows whose keys are all masked return zeros (not NaN).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    if precise:
        q_BTKGH, k_BSKH, v_BSKH = (a.astype(jnp.float32) for a in (q_BTKGH, k_BSKH, v_BSKH))
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    ).astype(jnp.float32)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask_BTS = key_mask(q_pos_BT, kv_len_B, S, causal=causal, sliding_window=sliding_window)
    mask = mask_BTS[:, None, None, :, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    if not precise:
        p = p.astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p, v_BSKH, preferred_element_type=jnp.float32)
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
