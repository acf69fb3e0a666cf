"""Linear-recurrence scans in plain jnp: the oracle and the ``xla`` path of ``kernels.scan``.

Per batch ``b`` and head ``h`` (group ``g = h // (H // G)``), with ``S_{-1}`` the initial state::

    S_t = exp(a_t) S_{t-1} + k_t^T v_t        o_t = q_t S_t          (S_t is [K, V])

``naive_scan`` steps this over time with ``lax.scan``: the oracle. ``chunked_scan`` is the
chunked (state-space-duality) form of Mamba-2 (Dao & Gu, arXiv:2405.21060, §6): within a chunk
of ``C`` tokens a masked quadratic form, across chunks the state carried by ``lax.scan``. With
``c_t`` the cumulative sum of ``a`` inside the chunk (``c_t <= 0``, decreasing) and ``S_in`` the
state entering the chunk::

    o_t   = sum_{s <= t} exp(c_t - c_s) (q_t . k_s) v_s + exp(c_t) q_t S_in
    S_out = exp(c_{C-1}) S_in + sum_s exp(c_{C-1} - c_s) k_s^T v_s

Every exponent is a difference ``c_t - c_s`` with ``s <= t`` or a ``c_t`` itself, so never
positive: nothing overflows however negative the decays. Both paths compute in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _heads(x_BTGK, H: int):
    """Repeat each of the ``G`` groups for its ``H // G`` heads: ``[B, T, H, K]``."""
    return jnp.repeat(x_BTGK, H // x_BTGK.shape[2], axis=2)


def naive_scan(q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, initial_state_BHKV=None):
    """The recurrence one token at a time (``lax.scan`` over ``T``), in float32.

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]`` queries and keys, one per group of ``H // G`` heads.
      v_BTHV: ``[B, T, H, V]`` values.
      log_decay_BTH: ``[B, T, H]`` ``a_t <= 0``.
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: outputs in ``v``'s dtype, the last state in float32.
    """
    B, T, H, V = v_BTHV.shape
    K = q_BTGK.shape[-1]
    f32 = jnp.float32
    q, k = _heads(q_BTGK.astype(f32), H), _heads(k_BTGK.astype(f32), H)
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), f32)

    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, a_BH = xs
        S_BHKV = jnp.exp(a_BH)[..., None, None] * S_BHKV + jnp.einsum("bhk,bhv->bhkv", k_BHK, v_BHV)
        return S_BHKV, jnp.einsum("bhk,bhkv->bhv", q_BHK, S_BHKV)

    xs = (q, k, v_BTHV.astype(f32), log_decay_BTH.astype(f32))
    S, o_TBHV = jax.lax.scan(step, initial_state_BHKV.astype(f32), jax.tree.map(_time_major, xs))
    return jnp.swapaxes(o_TBHV, 0, 1).astype(v_BTHV.dtype), S


def _time_major(x):
    return jnp.swapaxes(x, 0, 1)


def pad_to_chunks(q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, chunk_size: int):
    """Zero-pad ``T`` up to a multiple of ``chunk_size``: padded tokens have ``a = 0`` and
    ``k = 0``, so they leave the state unchanged (their outputs are sliced off)."""
    T = q_BTGK.shape[1]
    pad = -T % chunk_size

    def p(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    return p(q_BTGK), p(k_BTGK), p(v_BTHV), p(log_decay_BTH)


def causal_decay(c_BNHC):
    """``L[..., t, s] = exp(c_t - c_s)`` for ``s <= t``, else 0: ``[B, N, H, C, C]``. The
    exponent is masked before ``exp`` so it is never positive (no overflow, no NaN gradient)."""
    C = c_BNHC.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), bool))
    diff = c_BNHC[..., :, None] - c_BNHC[..., None, :]
    return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)


def chunked_scan(
    q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, initial_state_BHKV=None, *, chunk_size: int = 64
):
    """The chunked form (module docstring), in float32; same arguments and results as
    ``naive_scan``. ``T`` need not be a multiple of ``chunk_size``."""
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    R, C = H // G, chunk_size
    f32 = jnp.float32
    q, k, v, a = pad_to_chunks(
        *(x.astype(f32) for x in (q_BTGK, k_BTGK, v_BTHV, log_decay_BTH)), chunk_size
    )
    N = q.shape[1] // C
    q_BNCGK, k_BNCGK = q.reshape(B, N, C, G, K), k.reshape(B, N, C, G, K)
    v_BNCGRV = v.reshape(B, N, C, G, R, V)
    c_BNHC = jnp.cumsum(jnp.moveaxis(a.reshape(B, N, C, H), 2, 3), axis=-1)
    c_BNGRC = c_BNHC.reshape(B, N, G, R, C)
    c_last_BNGR = c_BNGRC[..., -1]

    # Intra-chunk: masked quadratic form, one q.k score matrix per group shared by its heads.
    scores_BNGTS = jnp.einsum("bntgk,bnsgk->bngts", q_BNCGK, k_BNCGK)
    decay_BNGRTS = causal_decay(c_BNHC).reshape(B, N, G, R, C, C)
    o_BNCGRV = jnp.einsum("bngts,bngrts,bnsgrv->bntgrv", scores_BNGTS, decay_BNGRTS, v_BNCGRV)

    # Each chunk's own contribution to the state it hands on, and its total decay.
    w_BNGRC = jnp.exp(c_last_BNGR[..., None] - c_BNGRC)
    dS_BNGRKV = jnp.einsum("bnsgk,bngrs,bnsgrv->bngrkv", k_BNCGK, w_BNGRC, v_BNCGRV)

    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), f32)
    S0_BGRKV = initial_state_BHKV.astype(f32).reshape(B, G, R, K, V)

    def step(S_BGRKV, xs):
        dS, c_last = xs
        return jnp.exp(c_last)[..., None, None] * S_BGRKV + dS, S_BGRKV

    S_BGRKV, S_in_NBGRKV = jax.lax.scan(
        step, S0_BGRKV, (jnp.moveaxis(dS_BNGRKV, 1, 0), jnp.moveaxis(c_last_BNGR, 1, 0))
    )
    # Inter-chunk: the entering state, decayed to each token of the chunk.
    o_BNCGRV += jnp.einsum("bntgk,bngrt,nbgrkv->bntgrv", q_BNCGK, jnp.exp(c_BNGRC), S_in_NBGRKV)
    o_BTHV = o_BNCGRV.reshape(B, N * C, H, V)[:, :T]
    return o_BTHV.astype(v_BTHV.dtype), S_BGRKV.reshape(B, H, K, V)
