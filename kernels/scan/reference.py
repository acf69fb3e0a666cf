"""Linear-recurrence scans in plain jnp: the oracle and the ``xla`` path of ``kernels.scan``.

Per batch ``b`` and head ``h`` (group ``g = h // (H // G)``), with ``S_{-1}`` the initial state::

    S_t = exp(a_t) S_{t-1} + k_t^T v_t        o_t = q_t S_t          (S_t is [K, V])

with a scalar ``a_t`` per head (``log_decay [B, T, H]``), or ``S_t = diag(exp(a_t)) S_{t-1} +
k_t^T v_t`` with one decay per key dimension (``log_decay [B, T, H, K]``: gated linear
attention, Yang et al., arXiv:2312.06635); the chunked vector form is ``chunked_scan_vector``.

``naive_scan`` steps this over time with ``lax.scan``: the oracle. ``chunked_scan`` is the
chunked (state-space-duality) form of Mamba-2 (Dao & Gu, arXiv:2405.21060, §6): within a chunk
of ``C`` tokens a masked quadratic form, across chunks the state carried by ``lax.scan``. With
``c_t`` the cumulative sum of ``a`` inside the chunk (``c_t <= 0``, decreasing) and ``S_in`` the
state entering the chunk::

    o_t   = sum_{s <= t} exp(c_t - c_s) (q_t . k_s) v_s + exp(c_t) q_t S_in
    S_out = exp(c_{C-1}) S_in + sum_s exp(c_{C-1} - c_s) k_s^T v_s

Every exponent is a difference ``c_t - c_s`` with ``s <= t`` or a ``c_t`` itself, so never
positive: nothing overflows however negative the decays. Both paths compute in float32.

Vector decay (``chunked_scan_vector``): ``c_t`` is now a ``[K]`` vector and the score of
``(t, s)`` is ``sum_k q_tk k_sk exp(c_tk - c_sk)``, which no longer factors into one ``[C, C]``
decay matrix. Splitting it as ``(q_t exp(c_t - c_r)) . (k_s exp(c_r - c_s))`` is exact for any
reference position ``r``, and both exponents are ``<= 0`` exactly when ``s <= r <= t``. So,
following GLA's secondary chunking (§4.3), each chunk is cut into sub-chunks of ``SUB_CHUNK``
tokens; queries of sub-chunk ``i`` take ``r`` = the token before it (``c_r = 0`` for the first),
which lies between them and every key of an earlier sub-chunk (one matmul per sub-chunk); the
``(t, s)`` pairs inside a sub-chunk are computed pairwise as ``[Cs, Cs, K]`` with
``exp(c_t - c_s)`` masked to ``s <= t`` before ``exp``. Hence no exponent is ever positive:
nothing overflows for any decays (``a = -1e4`` included), and what underflows is a product
``exp(c_t - c_r) exp(c_r - c_s) <= `` each factor, i.e. a term below float32's smallest
normal. No chunk-size limit follows from overflow; the rounding of ``c`` (a float32 cumulative
sum over at most ``C`` tokens) puts an absolute error of about ``C max|a| 2^-24`` into an
exponent, which matters only where ``c_t - c_s`` is small though ``c`` is large (strong decay
early in a chunk, weak later): keep ``C * max|a|`` below ~1e3 for ~1e-5 relative error there.
Cost per token beyond the scalar form: ``Cs * K`` for the pairwise block and ``C * K`` for the
rescaled keys (one copy per sub-chunk), so ``C`` of 64 and ``SUB_CHUNK`` 16 as in GLA. A chunk
whose length is not a multiple of ``SUB_CHUNK`` is padded inside with ``a = 0``, ``k = q = 0``
tokens, which leave the state unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUB_CHUNK = 16  # tokens per secondary chunk of the vector-decay form (GLA, §4.3)


def _heads(x_BTGK, H: int):
    """Repeat each of the ``G`` groups for its ``H // G`` heads: ``[B, T, H, K]``."""
    return jnp.repeat(x_BTGK, H // x_BTGK.shape[2], axis=2)


def naive_scan(q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, initial_state_BHKV=None):
    """The recurrence one token at a time (``lax.scan`` over ``T``), in float32.

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]`` queries and keys, one per group of ``H // G`` heads.
      v_BTHV: ``[B, T, H, V]`` values.
      log_decay_BTH: ``[B, T, H]`` ``a_t <= 0``, or ``[B, T, H, K]`` (one per key dimension).
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: outputs in ``v``'s dtype, the last state in float32.
    """
    B, T, H, V = v_BTHV.shape
    vector = log_decay_BTH.ndim == 4
    K = q_BTGK.shape[-1]
    f32 = jnp.float32
    q, k = _heads(q_BTGK.astype(f32), H), _heads(k_BTGK.astype(f32), H)
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), f32)

    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, a_BH = xs
        decay = jnp.exp(a_BH)[..., None] if vector else jnp.exp(a_BH)[..., None, None]
        S_BHKV = decay * S_BHKV + jnp.einsum("bhk,bhv->bhkv", k_BHK, v_BHV)
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
    ``naive_scan``. ``T`` need not be a multiple of ``chunk_size``. A ``[B, T, H, K]``
    ``log_decay`` goes to ``chunked_scan_vector``."""
    if log_decay_BTH.ndim == 4:
        return chunked_scan_vector(
            q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, initial_state_BHKV, chunk_size=chunk_size
        )
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


def pad_within_chunks(x_BT, chunk_size: int, sub_chunk: int):
    """``[B, N * C, ...] -> [B, N * Cp, ...]``: each chunk of ``C`` tokens zero-padded at its
    end to ``Cp``, a multiple of ``sub_chunk`` (padded tokens: ``a = 0``, ``k = 0``: no-ops)."""
    B, Tp = x_BT.shape[:2]
    C = chunk_size
    pad = -C % sub_chunk
    if not pad:
        return x_BT
    x = x_BT.reshape(B, Tp // C, C, *x_BT.shape[2:])
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(B, Tp // C * (C + pad), *x_BT.shape[2:])


def unpad_within_chunks(x_BT, chunk_size: int, sub_chunk: int):
    """Inverse of ``pad_within_chunks``."""
    B, Tq = x_BT.shape[:2]
    Cp = chunk_size + -chunk_size % sub_chunk
    x = x_BT.reshape(B, Tq // Cp, Cp, *x_BT.shape[2:])[:, :, :chunk_size]
    return x.reshape(B, -1, *x_BT.shape[2:])


def chunked_scan_vector(
    q_BTGK, k_BTGK, v_BTHV, log_decay_BTHK, initial_state_BHKV=None, *, chunk_size: int = 64
):
    """The chunked form with one decay per key dimension (module docstring), in float32.

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]``; v_BTHV: ``[B, T, H, V]``; ``G`` divides ``H``.
      log_decay_BTHK: ``[B, T, H, K]`` ``a_t <= 0``.
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).
      chunk_size: tokens per chunk; ``T`` need not be a multiple.

    Returns:
      ``(o_BTHV, final_state_BHKV)`` as ``naive_scan``.
    """
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    f32 = jnp.float32
    Cs = min(SUB_CHUNK, chunk_size)
    q, k, v, a = pad_to_chunks(
        _heads(q_BTGK.astype(f32), H),
        _heads(k_BTGK.astype(f32), H),
        v_BTHV.astype(f32),
        log_decay_BTHK.astype(f32),
        chunk_size,
    )
    q, k, v, a = (pad_within_chunks(x, chunk_size, Cs) for x in (q, k, v, a))
    Cp = chunk_size + -chunk_size % Cs
    N, Ns = q.shape[1] // Cp, Cp // Cs

    def chunks(x_BTHX):  # [B, N, H, Cp, X]
        return jnp.moveaxis(x_BTHX.reshape(B, N, Cp, H, -1), 2, 3)

    q_BNHCK, k_BNHCK, v_BNHCV = chunks(q), chunks(k), chunks(v)
    c_BNHCK = jnp.cumsum(chunks(a), axis=3)
    sub = (B, N, H, Ns, Cs)
    q_BNHIJK, k_BNHIJK = q_BNHCK.reshape(*sub, K), k_BNHCK.reshape(*sub, K)
    c_BNHIJK = c_BNHCK.reshape(*sub, K)
    # r_i: cumulative decay at the token before sub-chunk i (0 before the chunk).
    r_BNHIK = jnp.pad(c_BNHIJK[..., :-1, -1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])
    qr_BNHIJK = q_BNHIJK * jnp.exp(c_BNHIJK - r_BNHIK[..., None, :])  # t > r: exponent <= 0

    # Keys of earlier sub-chunks (s <= r_i), rescaled to sub-chunk i's reference: [.., I, Cp, K].
    earlier_IS = jnp.arange(Cp)[None, :] < (jnp.arange(Ns) * Cs)[:, None]
    mask = earlier_IS[:, :, None]
    expo = jnp.where(mask, r_BNHIK[..., :, None, :] - c_BNHCK[..., None, :, :], 0.0)
    kr_BNHISK = jnp.where(mask, jnp.exp(expo), 0.0) * k_BNHCK[..., None, :, :]
    o_BNHIJV = jnp.einsum(
        "bnhijk,bnhisk,bnhsv->bnhijv", qr_BNHIJK, kr_BNHISK, v_BNHCV, optimize=True
    )

    # Pairs inside a sub-chunk: exp(c_t - c_s) per key dim, masked to s <= t before exp.
    tri = jnp.tril(jnp.ones((Cs, Cs), bool))[:, :, None]
    diff = c_BNHIJK[..., :, None, :] - c_BNHIJK[..., None, :, :]
    decay_BNHITSK = jnp.where(tri, jnp.exp(jnp.where(tri, diff, 0.0)), 0.0)
    scores_BNHITS = jnp.einsum("bnhitk,bnhisk,bnhitsk->bnhits", q_BNHIJK, k_BNHIJK, decay_BNHITSK)
    o_BNHIJV += jnp.einsum("bnhits,bnhisv->bnhitv", scores_BNHITS, v_BNHCV.reshape(*sub, V))

    # Each chunk's own contribution to the state it hands on, and its total decay per key dim.
    c_last_BNHK = c_BNHCK[..., -1, :]
    w_BNHCK = jnp.exp(c_last_BNHK[..., None, :] - c_BNHCK)
    dS_BNHKV = jnp.einsum("bnhsk,bnhsv->bnhkv", k_BNHCK * w_BNHCK, v_BNHCV)
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), f32)

    def step(S_BHKV, xs):
        dS, c_last = xs
        return jnp.exp(c_last)[..., None] * S_BHKV + dS, S_BHKV

    S_BHKV, S_in_NBHKV = jax.lax.scan(
        step,
        initial_state_BHKV.astype(f32),
        (jnp.moveaxis(dS_BNHKV, 1, 0), jnp.moveaxis(c_last_BNHK, 1, 0)),
    )
    # Inter-chunk: the entering state, decayed to each token (exp(c_t), c_t <= 0).
    o_BNHCV = o_BNHIJV.reshape(B, N, H, Cp, V)
    o_BNHCV += jnp.einsum("bnhtk,nbhkv->bnhtv", q_BNHCK * jnp.exp(c_BNHCK), S_in_NBHKV)
    o_BTHV = unpad_within_chunks(
        jnp.moveaxis(o_BNHCV, 3, 2).reshape(B, N * Cp, H, V), chunk_size, Cs
    )
    return o_BTHV[:, :T].astype(v_BTHV.dtype), S_BHKV
