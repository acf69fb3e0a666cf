"""Attention ops: full-sequence (prefill/training), decode over a KV cache, and cached chunks.

Layouts (STYLE.md letters): queries ``q_BTNH``, keys and values ``k_BSKH`` / ``v_BSKH`` with
``N % K == 0`` (MHA ``K == N``, GQA, MQA ``K == 1``, as in Pope et al. 2022 §3.3). Softmax
statistics are float32 in every implementation.

Implementations (``impl``):
  ``reference``  plain jnp in float32: the oracle.
  ``xla``        the same math with matmul inputs in their own dtype, float32 accumulation.
  ``auto``       the best path available on the running backend (``xla`` until the Pallas
                 kernels of the attention issue land).

Example::

    out_BTNH = kernels.attention.attention(q, k, v, causal=True, sliding_window=4096)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.attention import reference

IMPLS = ("auto", "reference", "xla")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {list(IMPLS)}")
    return "xla" if impl == "auto" else impl


def _check_qkv(q, k, v, q_name: str, q_rank: int) -> None:
    if q.ndim != q_rank:
        raise ValueError(f"{q_name} must have rank {q_rank}, got shape {q.shape}")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [B, S, K, H] with equal shapes, got {k.shape} and {v.shape}"
        )
    B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(
            f"batch/head_dim mismatch: {q_name} {q.shape} vs k {k.shape} (need B and H equal)"
        )
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads N={N} not divisible by kv heads K={K}")
    for name, a in ((q_name, q), ("k", k), ("v", v)):
        if a.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float array, got {a.dtype}")


def _check_lengths(lengths, B: int, name: str) -> None:
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape ({B},), got {lengths.shape}")


def _check_options(sliding_window, softcap) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


_STATIC = ("causal", "sliding_window", "softcap", "scale", "impl", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    lengths=None,
    softcap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
):
    """Multi-head attention where the queries are the last ``T`` of ``S`` positions.

    Args:
      q_BTNH: queries; query ``t`` sits at position ``S - T + t``.
      k_BSKH, v_BSKH: keys and values at positions ``0..S-1``.
      causal: a query sees only keys at positions ``<=`` its own.
      sliding_window: ``w`` restricts a query at ``p`` to keys at positions ``> p - w``.
      lengths: optional ``[B]`` int; keys at positions ``>= lengths[b]`` are masked.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before the softmax (Gemma 2).
      scale: logit scale, default ``H ** -0.5``.
      impl: see the module docstring.
      interpret: run Pallas paths in interpret mode (no effect on jnp paths).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``. Rows with no visible key are zeros.
    """
    del interpret
    _check_qkv(q_BTNH, k_BSKH, v_BSKH, "q_BTNH", 4)
    _check_options(sliding_window, softcap)
    B, T, _, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if T > S:
        raise ValueError(f"more queries than keys: T={T} > S={S}")
    if lengths is None:
        lengths = jnp.full((B,), S, jnp.int32)
    _check_lengths(lengths, B, "lengths")
    q_pos_BT = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    return _masked(
        q_BTNH, k_BSKH, v_BSKH, q_pos_BT, lengths, causal, sliding_window, softcap, scale, impl
    )


@functools.partial(jax.jit, static_argnames=_STATIC[1:])
def decode_attention(
    q_BNH,
    k_BSKH,
    v_BSKH,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
):
    """One new query per sequence against a KV cache.

    Args:
      q_BNH: the query of the token at position ``lengths[b] - 1``.
      k_BSKH, v_BSKH: the cache; its first ``lengths[b]`` positions are valid and include the
        new token's own key and value.
      lengths_B: int ``[B]`` valid cache positions per sequence.

    Returns:
      ``[B, N, H]`` in the dtype of ``q``.
    """
    del interpret
    _check_qkv(q_BNH, k_BSKH, v_BSKH, "q_BNH", 3)
    _check_options(sliding_window, softcap)
    _check_lengths(lengths_B, q_BNH.shape[0], "lengths_B")
    q_pos_BT = (lengths_B - 1)[:, None].astype(jnp.int32)
    out = _masked(
        q_BNH[:, None],
        k_BSKH,
        v_BSKH,
        q_pos_BT,
        lengths_B,
        True,
        sliding_window,
        softcap,
        scale,
        impl,
    )
    return out[:, 0]


@functools.partial(jax.jit, static_argnames=_STATIC[1:])
def cached_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    starts_B,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
):
    """A chunk of ``T`` new queries per sequence against a KV cache (chunked prefill, verify).

    Generalises ``decode_attention`` to ``T > 1``: query ``t`` of sequence ``b`` sits at
    position ``starts[b] + t`` and sees cache positions ``< lengths[b]`` causally.

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``.
    """
    del interpret
    _check_qkv(q_BTNH, k_BSKH, v_BSKH, "q_BTNH", 4)
    _check_options(sliding_window, softcap)
    B, T = q_BTNH.shape[:2]
    _check_lengths(starts_B, B, "starts_B")
    _check_lengths(lengths_B, B, "lengths_B")
    q_pos_BT = starts_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)
    return _masked(
        q_BTNH, k_BSKH, v_BSKH, q_pos_BT, lengths_B, True, sliding_window, softcap, scale, impl
    )


def _masked(q, k, v, q_pos_BT, kv_len_B, causal, sliding_window, softcap, scale, impl):
    impl = _resolve_impl(impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return reference.masked_attention(
        q,
        k,
        v,
        q_pos_BT,
        kv_len_B.astype(jnp.int32),
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        precise=impl == "reference",
    )
