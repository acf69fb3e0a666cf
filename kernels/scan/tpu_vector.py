"""Chunked scan with a decay per key dimension as Pallas Mosaic TPU kernels, forward and backward.

Gated linear attention (Yang et al., arXiv:2312.06635): ``S_t = diag(exp(a_t)) S_{t-1} +
k_t^T v_t``, ``o_t = q_t S_t`` with ``a_t`` of shape ``[K]``. Grid ``(B, H, chunks)`` as in
``tpu.py``, the ``[K, V]`` float32 state in VMEM across the sequential chunk axis. Per chunk,
with ``c`` the within-chunk cumulative log decays ``[C, K]`` (wrapper) and the secondary
chunking of ``reference.chunked_scan_vector`` (sub-chunks of ``Cs = reference.SUB_CHUNK``
tokens; for sub-chunk ``i`` the reference ``r`` is ``c`` at the token before it, 0 for the
first)::

    o_i  = ((q_i exp(c_i - r)) (k_<i exp(r - c_<i))^T) v_<i       MXU, keys of earlier sub-chunks
         + (sum_k q_i k_i exp(c_t - c_s), s <= t) v_i             VPU [Cs, Cs, K], then MXU
         + (q_i exp(c_i)) S                                       MXU
    S   <- diag(exp(c_last)) S + (k exp(c_last - c))^T v          MXU

Every exponent is ``<= 0`` (masked before ``exp`` inside a sub-chunk), so nothing overflows for
any decays; see ``reference`` for the rounding argument. A chunk that is not a multiple of
``Cs`` is padded inside with no-op tokens (``a = 0``, ``k = q = 0``) by the wrapper.

The backward kernel sweeps the chunks in reverse carrying ``dS`` (gradient of the state leaving
the chunk), reading each chunk's entering state from the forward's residuals
(``[B, H, chunks, K, V]`` float32) and recomputing the three terms above per sub-chunk: the
state terms by MXU (``dq = (do S^T) exp(c)``, ``dk = (v dS^T) w``, ``dv = (k w) dS``,
``dS <- diag(exp(c_last)) dS + (q exp(c))^T do``), the earlier-sub-chunk terms by MXU through the
same rescaled ``q_r``/``k_r``, the in-sub-chunk pairs on the VPU as ``[Cs, Cs, K]``. The log
decay needs no extra recomputation: with ``C`` the cumulative log decay over the whole sequence
the output depends on it only through ``q exp(C)``, ``k exp(-C)`` and the final state's
``diag(exp(C_last))``, so per key dimension ``dL/dC_t = q_t dq_t - k_t dk_t`` (plus
``sum_v S_T dS_T`` at the last token) and ``da`` is its reverse cumulative sum (GLA §4.1), taken
in the kernel: a triangular matmul within the chunk plus a ``[1, K]`` carry across chunks.
``dq``/``dk`` per head are summed over each group's heads in the wrapper.
Validated in TPU interpret mode only; not yet run on a TPU. Example::

    o_BTHV, S_BHKV = chunked_scan(q, k, v, log_decay_BTHK, None, chunk_size=64, interpret=True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.scan import reference, tpu
from kernels.scan.tpu import _NN, _NT, _TN, _dot


def _fwd_kernel(q_ref, k_ref, v_ref, c_ref, clast_ref, s0_ref, o_ref, sT_ref, *rest, sub: int):
    *states_ref, s_sc = rest  # states_ref: [] or [the entering state of each chunk]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_sc[...] = s0_ref[...]

    f32 = jnp.float32
    S = s_sc[...]
    if states_ref:
        states_ref[0][...] = S
    q, k, v, c = q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...], c_ref[...]
    cd = v.dtype
    C, K = q.shape
    tri = _tri(sub)
    S_cd = S.astype(cd)
    for i in range(C // sub):
        lo, hi = i * sub, (i + 1) * sub
        q_i, k_i, c_i = q[lo:hi], k[lo:hi], c[lo:hi]
        p = jnp.sum(q_i[:, None, :] * k_i[None, :, :] * _pair_decay(c_i, tri), axis=-1)
        o = _dot(p.astype(cd), v[lo:hi], _NN)
        o += _dot((q_i * jnp.exp(c_i)).astype(cd), S_cd, _NN)
        if i:
            q_r, k_r, _, _ = _rescaled(q_i, k[:lo], c, lo)
            o += _dot(_dot(q_r.astype(cd), k_r.astype(cd), _NT).astype(cd), v[:lo], _NN)
        o_ref[lo:hi, :] = o.astype(o_ref.dtype)
    w = jnp.exp(c[C - 1 :] - c)
    s_sc[...] = jnp.exp(clast_ref[...]) * S + _dot((k * w).astype(cd), v, _TN)

    @pl.when(n == pl.num_programs(2) - 1)
    def _final():
        sT_ref[...] = s_sc[...]


def _tri(sub: int):
    """``[sub, sub, 1]``: ``s <= t``."""
    return jax.lax.broadcasted_iota(jnp.int32, (sub, sub, 1), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (sub, sub, 1), 1
    )


def _pair_decay(c_i, tri):
    """``[Cs, Cs, K]``: ``exp(c_t - c_s)`` per key dim for ``s <= t`` (masked before exp)."""
    return jnp.where(tri, jnp.exp(jnp.where(tri, c_i[:, None, :] - c_i[None, :, :], 0.0)), 0.0)


def _rescaled(q_i, k_lt, c, lo: int):
    """Sub-chunk ``[lo, lo + Cs)`` against the keys before it, through ``r = c[lo - 1]``:
    ``(q_i exp(c_i - r), k_<lo exp(r - c_<lo))`` and those two factors (exponents <= 0)."""
    r = c[lo - 1 : lo]
    eq, ek = jnp.exp(c[lo : lo + q_i.shape[0]] - r), jnp.exp(r - c[:lo])
    return q_i * eq, k_lt * ek, eq, ek


def _bwd_kernel(
    q_ref, k_ref, v_ref, c_ref, clast_ref, states_ref, do_ref, dsT_ref, dcT_ref,
    dq_ref, dk_ref, dv_ref, da_ref, ds0_ref, ds_sc, dc_sc, *, sub: int,
):  # fmt: skip
    n = pl.program_id(2)  # chunks in reverse

    @pl.when(n == 0)
    def _init():
        ds_sc[...] = dsT_ref[...]
        dc_sc[...] = dcT_ref[...]

    f32 = jnp.float32
    dS, S = ds_sc[...], states_ref[...]
    q, k, v, c = q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...], c_ref[...]
    do = do_ref[...]
    cd = v.dtype
    C, K = q.shape
    e, w = jnp.exp(c), jnp.exp(c[C - 1 :] - c)
    dS_cd = dS.astype(cd)
    # The entering state (o += (q e) S) and the leaving one (S_out = e_last S + (k w)^T v).
    dq_ref[...] = _dot(do, S.astype(cd), _NT) * e
    dk_ref[...] = _dot(v, dS_cd, _NT) * w
    dv_ref[...] = _dot((k * w).astype(cd), dS_cd, _NN)
    ds_sc[...] = jnp.exp(clast_ref[...]) * dS + _dot((q * e).astype(cd), do, _TN)
    tri = _tri(sub)
    for i in range(C // sub):
        lo, hi = i * sub, (i + 1) * sub
        q_i, k_i, do_i = q[lo:hi], k[lo:hi], do[lo:hi]
        D = _pair_decay(c[lo:hi], tri)  # [t, s, K], zero for s > t
        dP = _dot(do_i, v[lo:hi], _NT)  # d(score) of each (t, s)
        P = jnp.sum(q_i[:, None, :] * k_i[None, :, :] * D, axis=-1)
        dq_ref[lo:hi, :] += jnp.sum(dP[:, :, None] * k_i[None, :, :] * D, axis=1)
        dk_ref[lo:hi, :] += jnp.sum(dP[:, :, None] * q_i[:, None, :] * D, axis=0)
        dv_ref[lo:hi, :] += _dot(P.astype(cd), do_i, _TN)
        if i:
            q_r, k_r, eq, ek = _rescaled(q_i, k[:lo], c, lo)
            dA = _dot(do_i, v[:lo], _NT)  # [Cs, lo]
            A = _dot(q_r.astype(cd), k_r.astype(cd), _NT)
            dq_ref[lo:hi, :] += _dot(dA.astype(cd), k_r.astype(cd), _NN) * eq
            dk_ref[:lo, :] += _dot(dA.astype(cd), q_r.astype(cd), _TN) * ek
            dv_ref[:lo, :] += _dot(A.astype(cd), do_i, _TN)
    # dL/dC_t = q_t * dq_t - k_t * dk_t per key dim (C the cumulative log decay over the whole
    # sequence; module docstring); da_t = sum over t' >= t: in-chunk reverse cumsum + carry.
    dC = q * dq_ref[...] - k * dk_ref[...]
    upper = (
        jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
        <= jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    ).astype(f32)
    da = _dot(upper, dC, _NN) + dc_sc[...]
    da_ref[...] = da
    dc_sc[...] = da[:1]

    @pl.when(n == pl.num_programs(2) - 1)
    def _final():
        ds0_ref[...] = ds_sc[...]


def _specs(B, H, G, Tq, K, V, Cp, interpret, *, reverse):
    sp = tpu._specs(B, H, G, Tq, K, V, tpu._Config(Cp, interpret), reverse=reverse)
    sq, N = pl.Squeezed(), Tq // Cp

    def chunk(n):
        return N - 1 - n if reverse else n

    sp["clast"] = pl.BlockSpec((sq, sq, sq, K, 1), lambda b, h, n: (b, h, chunk(n), 0, 0))
    sp["row_K"] = pl.BlockSpec((sq, sq, 1, K), lambda b, h, n: (b, h, 0, 0))
    return sp


def _cumsums(a_BHTK, Cp: int):
    """Within-chunk cumulative log decays ``[B, H, Tq, K]`` and their last ``[B, H, N, K, 1]``."""
    B, H, Tq, K = a_BHTK.shape
    c = jnp.cumsum(a_BHTK.reshape(B, H, Tq // Cp, Cp, K), axis=3)
    return c.reshape(B, H, Tq, K), c[:, :, :, -1, :, None]


def _forward(q_BGTK, k_BGTK, v_BHTV, a_BHTK, s0_BHKV, cfg: tpu._Config, *, save_states: bool):
    """Inputs padded to chunks of ``Cp = cfg.chunk_size`` tokens, each a multiple of the
    sub-chunk -> ``(o [B, H, Tq, V], S [B, H, K, V][, entering states [B, H, N, K, V]])``."""
    (B, G, Tq, K), (H, V) = q_BGTK.shape, v_BHTV.shape[1::2]
    Cp = cfg.chunk_size
    N = Tq // Cp
    sp = _specs(B, H, G, Tq, K, V, Cp, cfg.interpret, reverse=False)
    dims = (B, H, N, Tq, K, V)
    out_shape, out_specs = tpu.forward_outputs(sp, dims, v_BHTV.dtype, save_states)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, sub=min(reference.SUB_CHUNK, Cp)),
        grid=(B, H, N),
        in_specs=[sp["qk"], sp["qk"], sp["head_V"], sp["head_K"], sp["clast"], sp["state"]],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=tpu._COMPILER_PARAMS,
        interpret=tpu._interpret(cfg),
        name="chunked_scan_vector_fwd",
    )(q_BGTK, k_BGTK, v_BHTV, *_cumsums(a_BHTK, Cp), s0_BHKV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(q_BGTK, k_BGTK, v_BHTV, a_BHTK, s0_BHKV, cfg: tpu._Config):
    o, sT = _forward(q_BGTK, k_BGTK, v_BHTV, a_BHTK, s0_BHKV, cfg, save_states=False)
    return o, sT


def _scan_fwd(q_BGTK, k_BGTK, v_BHTV, a_BHTK, s0_BHKV, cfg: tpu._Config):
    o, sT, states = _forward(q_BGTK, k_BGTK, v_BHTV, a_BHTK, s0_BHKV, cfg, save_states=True)
    return (o, sT), (q_BGTK, k_BGTK, v_BHTV, a_BHTK, states, sT)


def _scan_bwd(cfg: tpu._Config, res, cotangents):
    q_BGTK, k_BGTK, v_BHTV, a_BHTK, states, sT_BHKV = res
    do_BHTV, dsT_BHKV = cotangents
    (B, G, Tq, K), (H, V) = q_BGTK.shape, v_BHTV.shape[1::2]
    Cp, R, f32 = cfg.chunk_size, H // G, jnp.float32
    sp = _specs(B, H, G, Tq, K, V, Cp, cfg.interpret, reverse=True)
    dsT_BHKV = dsT_BHKV.astype(f32)
    # The final state is diag(exp(C_last)) (...): its share of dL/dC at the last token.
    dcT_BH1K = jnp.sum(sT_BHKV * dsT_BHKV, axis=-1)[:, :, None, :]
    dq_BHTK, dk_BHTK, dv_BHTV, da_BHTK, ds0_BHKV = pl.pallas_call(
        functools.partial(_bwd_kernel, sub=min(reference.SUB_CHUNK, Cp)),
        grid=(B, H, Tq // Cp),
        in_specs=[
            sp["qk"], sp["qk"], sp["head_V"], sp["head_K"], sp["clast"], sp["states"],
            sp["head_V"], sp["state"], sp["row_K"],
        ],  # fmt: skip
        out_specs=[sp["head_K"], sp["head_K"], sp["head_V"], sp["head_K"], sp["state"]],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tq, K), f32),
            jax.ShapeDtypeStruct((B, H, Tq, K), f32),
            jax.ShapeDtypeStruct((B, H, Tq, V), f32),
            jax.ShapeDtypeStruct((B, H, Tq, K), f32),
            jax.ShapeDtypeStruct((B, H, K, V), f32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), f32), pltpu.VMEM((1, K), f32)],
        compiler_params=tpu._COMPILER_PARAMS,
        interpret=tpu._interpret(cfg),
        name="chunked_scan_vector_bwd",
    )(
        q_BGTK, k_BGTK, v_BHTV, *_cumsums(a_BHTK, Cp), states,
        do_BHTV.astype(v_BHTV.dtype), dsT_BHKV, dcT_BH1K,
    )  # fmt: skip

    def group_sum(d_BHTK):
        return d_BHTK.reshape(B, G, R, Tq, K).sum(2).astype(q_BGTK.dtype)

    return (
        group_sum(dq_BHTK),
        group_sum(dk_BHTK),
        dv_BHTV.astype(v_BHTV.dtype),
        da_BHTK.astype(a_BHTK.dtype),
        ds0_BHKV,
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def chunked_scan(
    q_BTGK,
    k_BTGK,
    v_BTHV,
    log_decay_BTHK,
    initial_state_BHKV=None,
    *,
    chunk_size: int = 64,
    interpret: bool = False,
):
    """The vector-decay chunked scan on TPU, forward and backward Pallas kernels.

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]``; v_BTHV: ``[B, T, H, V]``; ``G`` divides ``H``. The
        three are promoted to one dtype for the matmuls.
      log_decay_BTHK: ``[B, T, H, K]`` finite ``a_t <= 0``, used in float32.
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).
      chunk_size: tokens per chunk (a multiple of 8 on a TPU); ``T`` need not be a multiple.
      interpret: run in TPU interpret mode (CPU).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: ``o`` in ``v``'s dtype, the state in float32.
    """
    tpu._Config(chunk_size=chunk_size, interpret=interpret)  # validates chunk_size
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    dtype = jnp.result_type(q_BTGK.dtype, k_BTGK.dtype, v_BTHV.dtype)
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    C = chunk_size
    sub = min(reference.SUB_CHUNK, C)
    padded = reference.pad_to_chunks(
        q_BTGK.astype(dtype),
        k_BTGK.astype(dtype),
        v_BTHV.astype(dtype),
        log_decay_BTHK.astype(jnp.float32),
        C,
    )
    q, k, v, a = (jnp.swapaxes(reference.pad_within_chunks(x, C, sub), 1, 2) for x in padded)
    o_BHTV, sT_BHKV = _scan(
        q, k, v, a, initial_state_BHKV.astype(jnp.float32), tpu._Config(C + -C % sub, interpret)
    )
    o_BTHV = reference.unpad_within_chunks(jnp.swapaxes(o_BHTV, 1, 2), C, sub)
    return o_BTHV[:, :T].astype(v_BTHV.dtype), sT_BHKV
