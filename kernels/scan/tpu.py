"""Chunked linear-recurrence scan as Pallas Mosaic TPU kernels, forward and backward.

The chunked form of ``reference.chunked_scan`` (Mamba-2 SSD, Dao & Gu, arXiv:2405.21060, §6):
grid ``(B, H, chunks)``, the chunk axis sequential ("arbitrary") with the ``[K, V]`` float32
state in VMEM scratch. Per chunk of ``C`` tokens, with ``c`` the within-chunk cumulative sum of
the log decays (computed in the wrapper, passed as a column ``[C, 1]`` and a row ``[1, C]``)::

    L     = exp(c_t - c_s) for s <= t, else 0        (exponent masked first: never positive)
    o     = ((q k^T) * L) v + exp(c) * (q S)          three MXU matmuls
    S    <- exp(c_last) S + (exp(c_last - c) * k)^T v

The backward kernel sweeps the chunks in reverse carrying ``dS`` (the gradient of the state
leaving the chunk), reading the state entering each chunk from the forward's residuals
(``[B, H, chunks, K, V]`` float32) and recomputing the intra-chunk terms::

    dq = ((do v^T) * L) k + exp(c) * (do S^T)          dk = ((do v^T) * L)^T q + w * (v dS^T)
    dv = ((q k^T) * L)^T do + w * (k dS)               dS <- exp(c_last) dS + (exp(c) * q)^T do

with ``w = exp(c_last - c)``; ``dq``/``dk`` per head are summed over each group's heads in the
wrapper. The log-decay gradient needs no kernel: with ``C_t`` the cumulative sum over the whole
sequence, the output depends on ``C`` only through ``q_t exp(C_t)``, ``k_t exp(-C_t)`` and the
final state's factor ``exp(C_{T-1})``, so ``dL/dC_t = q_t . dq_t - k_t . dk_t`` (plus
``<S_{T-1}, dS_{T-1}>`` at ``t = T - 1``) and ``da`` is its reverse cumulative sum (as for GLA,
Yang et al., arXiv:2312.06635, §4.1).

Matmul inputs are in the inputs' dtype (float32 at ``HIGHEST`` precision), accumulation in
float32; states cross the MXU in that dtype too. On CPU pass ``interpret=True``::

    o_BTHV, S_BHKV = chunked_scan(q, k, v, log_decay, None, chunk_size=64, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.scan import reference

_NN = (((1,), (0,)), ((), ()))  # x @ y
_NT = (((1,), (1,)), ((), ()))  # x @ y^T
_TN = (((0,), (0,)), ((), ()))  # x^T @ y


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call (hashable: ``custom_vjp`` non-diff argument).

    ``chunk_size`` is the second-minor (sublane) dim of every tile: a multiple of 8 on a TPU
    (16 for 16-bit inputs); interpret mode takes any positive size.
    """

    chunk_size: int
    interpret: bool

    def __post_init__(self):
        C = self.chunk_size
        if not self.interpret and C % 8:
            raise ValueError(f"pallas_tpu chunk_size must be a multiple of 8 on a TPU, got {C}")


_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _interpret(cfg: _Config):
    return pltpu.InterpretParams() if cfg.interpret else False


def _dot(x, y, dims):
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(x, y, dims, precision=precision, preferred_element_type=jnp.float32)


def _decays(c_col_ref, c_row_ref):
    """``(L [C, C], exp(c) [C, 1], exp(c_last - c) [C, 1], exp(c_last) [1, 1])``."""
    c_col, c_row = c_col_ref[...], c_row_ref[...]
    C = c_col.shape[0]
    c_last = c_row[:, C - 1 :]
    causal = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (C, C), 1
    )
    diff = jnp.where(causal, c_col - c_row, 0.0)
    L = jnp.where(causal, jnp.exp(diff), 0.0)
    return L, jnp.exp(c_col), jnp.exp(c_last - c_col), jnp.exp(c_last)


def _fwd_kernel(q_ref, k_ref, v_ref, c_col_ref, c_row_ref, s0_ref, o_ref, sT_ref, *rest):
    *states_ref, s_sc = rest  # states_ref: [] or [the entering state of each chunk]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        s_sc[...] = s0_ref[...]

    S = s_sc[...]
    if states_ref:
        states_ref[0][...] = S
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    L, e, w, g = _decays(c_col_ref, c_row_ref)
    p = (_dot(q, k, _NT) * L).astype(v.dtype)
    o = _dot(p, v, _NN) + e * _dot(q, S.astype(q.dtype), _NN)
    o_ref[...] = o.astype(o_ref.dtype)
    s_sc[...] = g * S + _dot((w * k).astype(k.dtype), v, _TN)

    @pl.when(n == pl.num_programs(2) - 1)
    def _final():
        sT_ref[...] = s_sc[...]


def _bwd_kernel(
    q_ref, k_ref, v_ref, c_col_ref, c_row_ref, states_ref, do_ref, dsT_ref,
    dq_ref, dk_ref, dv_ref, ds0_ref, ds_sc,
):  # fmt: skip
    n = pl.program_id(2)  # chunks in reverse

    @pl.when(n == 0)
    def _init():
        ds_sc[...] = dsT_ref[...]

    dS, S = ds_sc[...], states_ref[...]
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    cd = v.dtype
    L, e, w, g = _decays(c_col_ref, c_row_ref)
    dp = (_dot(do, v, _NT) * L).astype(cd)  # d(q.k) of each (t, s), decay applied
    p = (_dot(q, k, _NT) * L).astype(cd)
    dq_ref[...] = _dot(dp, k, _NN) + e * _dot(do, S.astype(cd), _NT)
    dk_ref[...] = _dot(dp, q, _TN) + w * _dot(v, dS.astype(cd), _NT)
    dv_ref[...] = _dot(p, do, _TN) + w * _dot(k, dS.astype(cd), _NN)
    ds_sc[...] = g * dS + _dot((e * q).astype(cd), do, _TN)

    @pl.when(n == pl.num_programs(2) - 1)
    def _final():
        ds0_ref[...] = ds_sc[...]


def _chunk_cumsum(a_BHT, C: int):
    """Within-chunk cumulative sums: ``[B, H, Tp, 1]`` (columns) and ``[B, H, N, 1, C]`` (rows)."""
    B, H, Tp = a_BHT.shape
    c = jnp.cumsum(a_BHT.reshape(B, H, Tp // C, C), axis=-1)
    return c.reshape(B, H, Tp, 1), c[:, :, :, None, :]


def _specs(B, H, G, Tp, K, V, cfg: _Config, *, reverse: bool):
    """Block specs of the per-chunk tiles, chunks visited forwards or in reverse."""
    C, R, N = cfg.chunk_size, H // G, Tp // cfg.chunk_size
    sq = pl.Squeezed()

    def chunk(n):
        return N - 1 - n if reverse else n

    def per_head(width):
        return pl.BlockSpec((sq, sq, C, width), lambda b, h, n: (b, h, chunk(n), 0))

    return dict(
        qk=pl.BlockSpec((sq, sq, C, K), lambda b, h, n: (b, h // R, chunk(n), 0)),
        head_K=per_head(K),
        head_V=per_head(V),
        c_col=per_head(1),
        c_row=pl.BlockSpec((sq, sq, sq, 1, C), lambda b, h, n: (b, h, chunk(n), 0, 0)),
        state=pl.BlockSpec((sq, sq, K, V), lambda b, h, n: (b, h, 0, 0)),
        states=pl.BlockSpec((sq, sq, sq, K, V), lambda b, h, n: (b, h, chunk(n), 0, 0)),
    )


def forward_outputs(sp: dict, dims: tuple, dtype, save_states: bool) -> tuple[list, list]:
    """``out_shape`` and ``out_specs`` of a forward scan kernel (scalar or per-key decay):
    ``o [B, H, T, V]``, the final state ``[B, H, K, V]`` and, to save for the backward, the
    state entering each of the ``N`` chunks; ``dims = (B, H, N, T, K, V)``."""
    B, H, N, T, K, V = dims
    out_shape = [
        jax.ShapeDtypeStruct((B, H, T, V), dtype),
        jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
    ]
    out_specs = [sp["head_V"], sp["state"]]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
        out_specs.append(sp["states"])
    return out_shape, out_specs


def _forward(q_BGTK, k_BGTK, v_BHTV, a_BHT, s0_BHKV, cfg: _Config, *, save_states: bool):
    (B, G, Tp, K), (H, V) = q_BGTK.shape, v_BHTV.shape[1::2]
    N = Tp // cfg.chunk_size
    sp = _specs(B, H, G, Tp, K, V, cfg, reverse=False)
    out_shape, out_specs = forward_outputs(sp, (B, H, N, Tp, K, V), v_BHTV.dtype, save_states)
    return pl.pallas_call(
        _fwd_kernel,
        grid=(B, H, N),
        in_specs=[sp["qk"], sp["qk"], sp["head_V"], sp["c_col"], sp["c_row"], sp["state"]],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret(cfg),
        name="chunked_scan_fwd",
    )(q_BGTK, k_BGTK, v_BHTV, *_chunk_cumsum(a_BHT, cfg.chunk_size), s0_BHKV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(q_BGTK, k_BGTK, v_BHTV, a_BHT, s0_BHKV, cfg: _Config):
    o, sT = _forward(q_BGTK, k_BGTK, v_BHTV, a_BHT, s0_BHKV, cfg, save_states=False)
    return o, sT


def _scan_fwd(q_BGTK, k_BGTK, v_BHTV, a_BHT, s0_BHKV, cfg: _Config):
    o, sT, states = _forward(q_BGTK, k_BGTK, v_BHTV, a_BHT, s0_BHKV, cfg, save_states=True)
    return (o, sT), (q_BGTK, k_BGTK, v_BHTV, a_BHT, states, sT)


def _scan_bwd(cfg: _Config, res, cotangents):
    q_BGTK, k_BGTK, v_BHTV, a_BHT, states, sT_BHKV = res
    do_BHTV, dsT_BHKV = cotangents
    (B, G, Tp, K), (H, V) = q_BGTK.shape, v_BHTV.shape[1::2]
    R, N = H // G, Tp // cfg.chunk_size
    sp = _specs(B, H, G, Tp, K, V, cfg, reverse=True)
    f32 = jnp.float32
    dq_BHTK, dk_BHTK, dv_BHTV, ds0_BHKV = pl.pallas_call(
        _bwd_kernel,
        grid=(B, H, N),
        in_specs=[
            sp["qk"], sp["qk"], sp["head_V"], sp["c_col"], sp["c_row"], sp["states"],
            sp["head_V"], sp["state"],
        ],  # fmt: skip
        out_specs=[sp["head_K"], sp["head_K"], sp["head_V"], sp["state"]],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, K), f32),
            jax.ShapeDtypeStruct((B, H, Tp, K), f32),
            jax.ShapeDtypeStruct((B, H, Tp, V), f32),
            jax.ShapeDtypeStruct((B, H, K, V), f32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret(cfg),
        name="chunked_scan_bwd",
    )(
        q_BGTK, k_BGTK, v_BHTV, *_chunk_cumsum(a_BHT, cfg.chunk_size), states,
        do_BHTV.astype(v_BHTV.dtype), dsT_BHKV.astype(f32),
    )  # fmt: skip
    # dL/dC_t = q_t . dq_t - k_t . dk_t (+ <S_T, dS_T> at the end); da: its reverse cumsum.
    q_BHTK = jnp.repeat(q_BGTK.astype(f32), R, axis=1)
    k_BHTK = jnp.repeat(k_BGTK.astype(f32), R, axis=1)
    dC_BHT = jnp.sum(q_BHTK * dq_BHTK - k_BHTK * dk_BHTK, axis=-1)
    dC_BHT = dC_BHT.at[:, :, -1].add(jnp.sum(sT_BHKV * dsT_BHKV.astype(f32), axis=(2, 3)))
    da_BHT = jnp.flip(jnp.cumsum(jnp.flip(dC_BHT, -1), axis=-1), -1)

    def group_sum(d_BHTK):
        return d_BHTK.reshape(B, G, R, Tp, K).sum(2).astype(q_BGTK.dtype)

    return (
        group_sum(dq_BHTK),
        group_sum(dk_BHTK),
        dv_BHTV.astype(v_BHTV.dtype),
        da_BHT.astype(a_BHT.dtype),
        ds0_BHKV,
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def chunked_scan(
    q_BTGK,
    k_BTGK,
    v_BTHV,
    log_decay_BTH,
    initial_state_BHKV=None,
    *,
    chunk_size: int = 64,
    interpret: bool = False,
):
    """The chunked scan on TPU with a Pallas backward (every input, initial state included).

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]``; v_BTHV: ``[B, T, H, V]``; ``G`` divides ``H``. The
        three are promoted to one dtype for the matmuls.
      log_decay_BTH: ``[B, T, H]`` finite ``a_t <= 0``, used in float32; a ``[B, T, H, K]``
        decay per key dimension goes to ``tpu_vector.chunked_scan``.
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).
      chunk_size: tokens per chunk; ``T`` is zero-padded up to a multiple (``a = 0``, ``k = 0``).
      interpret: run in TPU interpret mode (CPU).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: ``o`` in ``v``'s dtype, the state in float32.
    """
    if log_decay_BTH.ndim == 4:  # decay per key dimension: forward kernel in tpu_vector.py
        from kernels.scan import tpu_vector

        return tpu_vector.chunked_scan(
            q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, initial_state_BHKV,
            chunk_size=chunk_size, interpret=interpret,
        )  # fmt: skip
    cfg = _Config(chunk_size=chunk_size, interpret=interpret)
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    dtype = jnp.result_type(q_BTGK.dtype, k_BTGK.dtype, v_BTHV.dtype)
    q, k, v, a = reference.pad_to_chunks(
        q_BTGK.astype(dtype),
        k_BTGK.astype(dtype),
        v_BTHV.astype(dtype),
        log_decay_BTH.astype(jnp.float32),
        chunk_size,
    )
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    o_BHTV, sT_BHKV = _scan(
        jnp.swapaxes(q, 1, 2),
        jnp.swapaxes(k, 1, 2),
        jnp.swapaxes(v, 1, 2),
        jnp.swapaxes(a, 1, 2),
        initial_state_BHKV.astype(jnp.float32),
        cfg,
    )
    return jnp.swapaxes(o_BHTV, 1, 2)[:, :T].astype(v_BTHV.dtype), sT_BHKV
