"""Chunked scan with a decay per key dimension as a Pallas Mosaic TPU kernel (forward).

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

The backward is the VJP of the jnp form (``reference.chunked_scan_vector``) inside a
``custom_vjp``, as the GPU kernel does; a reverse-sweep Pallas backward like ``tpu.py``'s (with
``da`` per key dimension: the reverse cumsum of ``q * dq - k * dk``) is not written yet.
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


def _fwd_kernel(q_ref, k_ref, v_ref, c_ref, clast_ref, s0_ref, o_ref, sT_ref, s_sc, *, sub: int):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_sc[...] = s0_ref[...]

    f32 = jnp.float32
    S = s_sc[...]
    q, k, v, c = q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...], c_ref[...]
    cd = v.dtype
    C, K = q.shape
    tri = jax.lax.broadcasted_iota(jnp.int32, (sub, sub, 1), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (sub, sub, 1), 1
    )
    S_cd = S.astype(cd)
    for i in range(C // sub):
        lo, hi = i * sub, (i + 1) * sub
        q_i, k_i, c_i = q[lo:hi], k[lo:hi], c[lo:hi]
        # Pairs inside the sub-chunk: exp(c_t - c_s) per key dim, masked to s <= t before exp.
        diff = jnp.where(tri, c_i[:, None, :] - c_i[None, :, :], 0.0)
        L = jnp.where(tri, jnp.exp(diff), 0.0)
        p = jnp.sum(q_i[:, None, :] * k_i[None, :, :] * L, axis=-1)
        o = _dot(p.astype(cd), v[lo:hi], _NN)
        o += _dot((q_i * jnp.exp(c_i)).astype(cd), S_cd, _NN)
        if i:
            r = c[lo - 1 : lo]  # s < lo <= t: both exponents <= 0
            q_r = (q_i * jnp.exp(c_i - r)).astype(cd)
            k_r = (k[:lo] * jnp.exp(r - c[:lo])).astype(cd)
            o += _dot(_dot(q_r, k_r, _NT).astype(cd), v[:lo], _NN)
        o_ref[lo:hi, :] = o.astype(o_ref.dtype)
    w = jnp.exp(c[C - 1 :] - c)
    s_sc[...] = jnp.exp(clast_ref[...]) * S + _dot((k * w).astype(cd), v, _TN)

    @pl.when(n == pl.num_programs(2) - 1)
    def _final():
        sT_ref[...] = s_sc[...]


def _forward(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg: tpu._Config):
    """Unpadded inputs (one dtype; ``a`` float32) -> ``(o [B, T, H, V], S [B, H, K, V])``."""
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    C = cfg.chunk_size
    sub = min(reference.SUB_CHUNK, C)
    padded = reference.pad_to_chunks(q_BTGK, k_BTGK, v_BTHV, a_BTHK, C)
    q, k, v, a = (reference.pad_within_chunks(x, C, sub) for x in padded)
    Cp = C + -C % sub
    Tq = q.shape[1]
    N = Tq // Cp
    c_BHNCK = jnp.cumsum(jnp.moveaxis(a, 1, 2).reshape(B, H, N, Cp, K), axis=3)
    sp = tpu._specs(B, H, G, Tq, K, V, tpu._Config(Cp, cfg.interpret), reverse=False)
    sq = pl.Squeezed()
    clast_spec = pl.BlockSpec((sq, sq, sq, K, 1), lambda b, h, n: (b, h, n, 0, 0))
    o_BHTV, sT_BHKV = pl.pallas_call(
        functools.partial(_fwd_kernel, sub=sub),
        grid=(B, H, N),
        in_specs=[
            sp["qk"],
            sp["qk"],
            sp["head_V"],
            sp["head_K"],
            clast_spec,
            sp["state"],
        ],  # fmt: skip
        out_specs=[sp["head_V"], sp["state"]],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tq, V), v.dtype),
            jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=tpu._COMPILER_PARAMS,
        interpret=tpu._interpret(cfg),
        name="chunked_scan_vector_fwd",
    )(
        jnp.swapaxes(q, 1, 2),
        jnp.swapaxes(k, 1, 2),
        jnp.swapaxes(v, 1, 2),
        c_BHNCK.reshape(B, H, Tq, K),
        c_BHNCK[:, :, :, -1, :, None],
        s0_BHKV,
    )
    o_BTHV = reference.unpad_within_chunks(jnp.swapaxes(o_BHTV, 1, 2), C, sub)
    return o_BTHV[:, :T], sT_BHKV


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg: tpu._Config):
    return _forward(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg)


def _scan_fwd(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg: tpu._Config):
    out = _forward(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg)
    return out, (q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV)


def _scan_bwd(cfg: tpu._Config, res, cotangents):
    f = functools.partial(reference.chunked_scan_vector, chunk_size=cfg.chunk_size)
    _, vjp = jax.vjp(f, *res)
    return vjp(cotangents)


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
    """The vector-decay chunked scan: Pallas forward, backward through the jnp form's VJP.

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
    cfg = tpu._Config(chunk_size=chunk_size, interpret=interpret)
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    dtype = jnp.result_type(q_BTGK.dtype, k_BTGK.dtype, v_BTHV.dtype)
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    o, sT = _scan(
        q_BTGK.astype(dtype),
        k_BTGK.astype(dtype),
        v_BTHV.astype(dtype),
        log_decay_BTHK.astype(jnp.float32),
        initial_state_BHKV.astype(jnp.float32),
        cfg,
    )
    return o.astype(v_BTHV.dtype), sT
