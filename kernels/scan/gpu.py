"""Chunked linear-recurrence scan, forward as a Pallas Mosaic GPU (Hopper) kernel.

One program (one warpgroup) per (batch, head) runs a TMA pipeline over the chunks of ``C = 64``
tokens, carrying the ``[K, V]`` float32 state in registers (WGMMA layout). Per chunk, with
``c`` the within-chunk cumulative log decay (wrapper) loaded as a row and a column vector::

    scores = q k^T                        wgmma, K-major SMEM B operand read transposed
    o      = ((scores * L) v)             wgmma, P from registers (input dtype)
           + exp(c) * (q S)               wgmma, S staged to SMEM in the input dtype
    S     <- exp(c_last) S + (w k)^T v    wgmma, A = the rescaled keys read transposed

with ``L = exp(c_t - c_s)`` on ``s <= t`` (exponent masked first) and ``w = exp(c_last - c)``.
Every wgmma operand pair shares a 128-byte swizzle, so on the GPU ``K`` and ``V`` are
multiples of 64 and the inputs float16/bfloat16. The backward is the VJP of the jnp chunked
form (``reference.chunked_scan``) inside a ``custom_vjp``. A decay per key dimension
(``log_decay [B, T, H, K]``, gated linear attention) runs ``gpu_vector.py`` behind the same
entry point, limits and backward.

Interpret mode (CPU) swaps the wgmmas for float32 ``dot_general``s and skips layout casts, as
``kernels.attention.gpu`` does; there float32 inputs and other ``K``/``V`` are allowed.
Validated in interpret mode and by cross-lowering for CUDA (``tests/kernels/test_scan_gpu.py``);
not yet run on a GPU. Example::

    o_BTHV, S_BHKV = chunked_scan(q, k, v, log_decay, None, chunk_size=64, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu as attn_gpu
from kernels.scan import reference

# Lane (per-thread) lowering semantics, pinned: the kernel places every register array itself
# (``plgpu.load(..., layout=)``, ``layout_cast``, WGMMA row/column vectors). JAX 0.11 made
# Warpgroup semantics the default, whose layout inference finds no solution for this kernel
# ("Layout inference failed to find a solution") at lowering time.
COMPILER_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call (hashable: ``custom_vjp`` non-diff argument).

    ``chunk_size`` is the wgmma M of every per-chunk matmul: 64 on the GPU (one warpgroup's
    rows; larger chunks would need one accumulator per 64 rows). Interpret mode takes any
    multiple of 8.
    """

    chunk_size: int
    num_stages: int
    interpret: bool

    def __post_init__(self):
        C = self.chunk_size
        if self.interpret and C % 8:
            raise ValueError(f"pallas_gpu chunk_size must be a multiple of 8, got {C}")
        if not self.interpret and C != 64:
            raise ValueError(f"pallas_gpu chunk_size must be 64 on the GPU, got {C}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def _mm(a, b, *, ta: bool = False, tb: bool = False, interpreting: bool):
    """``op(a) @ op(b)`` in float32 from SMEM refs (``a`` may be registers when not ``ta``)."""
    if interpreting:
        dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
        return jax.lax.dot_general(a[...], b[...], dims, preferred_element_type=jnp.float32)
    M = a.shape[1] if ta else a.shape[0]
    N = b.shape[0] if tb else b.shape[1]

    def mma(acc_ref):
        lhs = plgpu.transpose_ref(a, (1, 0)) if ta else a
        rhs = plgpu.transpose_ref(b, (1, 0)) if tb else b
        plgpu.wgmma(acc_ref, lhs, rhs)
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((M, N), jnp.float32))


def _kernel(q_ref, k_ref, v_ref, c_ref, clast_ref, s0_ref, o_ref, sT_ref, *, cfg: _Config, R: int):
    interpreting = cfg.interpret
    _cast = (lambda x, layout: x) if interpreting else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    ROW, COL = L.reduce(1), L.reduce(0)  # a value per row / per column of a WGMMA tile
    b, h = jax.lax.axis_index("b"), jax.lax.axis_index("h")
    g = h // R
    C, K, V = cfg.chunk_size, q_ref.shape[3], v_ref.shape[3]
    dtype = q_ref.dtype

    def load(ref, layout):
        return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)

    def scoped(s_smem, kw_smem, o_smem, f32_smem, barrier):
        plgpu.copy_gmem_to_smem(s0_ref.at[b, h], f32_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        S0 = load(f32_smem, L)
        causal = _cast(jax.lax.broadcasted_iota(jnp.int32, (C, C), 0), L) >= _cast(
            jax.lax.broadcasted_iota(jnp.int32, (C, C), 1), L
        )

        def body(indices, q_smem, k_smem, v_smem, c_smem, S):
            (n,) = indices
            c_t, c_s = load(c_smem, ROW), load(c_smem, COL)
            c_last = clast_ref[b, h, n]
            diff = jax.lax.broadcast_in_dim(c_t, (C, C), (0,)) - jax.lax.broadcast_in_dim(
                c_s, (C, C), (1,)
            )
            decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
            scores = _mm(q_smem, k_smem, tb=True, interpreting=interpreting)
            p = (scores * decay).astype(dtype)
            s_smem[...] = S.astype(dtype)
            # keys rescaled to the chunk's end: w_s k_s
            w = jax.lax.broadcast_in_dim(jnp.exp(c_last - c_t), (C, K), (0,))
            kw_smem[...] = (load(k_smem, L).astype(jnp.float32) * w).astype(dtype)
            plgpu.commit_smem()
            e = jax.lax.broadcast_in_dim(jnp.exp(c_t), (C, V), (0,))
            o = _mm(p, v_smem, interpreting=interpreting) + e * _mm(
                q_smem, s_smem, interpreting=interpreting
            )
            S = jnp.exp(c_last) * S + _mm(kw_smem, v_smem, ta=True, interpreting=interpreting)
            plgpu.wait_smem_to_gmem(0)  # the previous chunk's output has left o_smem
            o_smem[...] = o.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(n * C, C), h])
            return S

        tile = lambda width: plgpu.BlockSpec(  # noqa: E731
            (C, width), lambda n: (n, 0), transforms=attn_gpu.smem_transforms(width, dtype)
        )
        S = plgpu.emit_pipeline(
            body,
            grid=(c_ref.shape[2] // C,),
            in_specs=[tile(K), tile(K), tile(V), plgpu.BlockSpec((C,), lambda n: (n,))],
            max_concurrent_steps=cfg.num_stages,
            init_carry=S0,
        )(q_ref.at[b, :, g, :], k_ref.at[b, :, g, :], v_ref.at[b, :, h, :], c_ref.at[b, h])
        plgpu.wait_smem_to_gmem(0)
        f32_smem[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f32_smem, sT_ref.at[b, h])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((K, V), dtype, transforms=attn_gpu.smem_transforms(V, dtype)),
        plgpu.SMEM((C, K), dtype, transforms=attn_gpu.smem_transforms(K, dtype)),
        plgpu.SMEM((C, V), o_ref.dtype, transforms=attn_gpu.smem_transforms(V, o_ref.dtype)),
        plgpu.SMEM((K, V), jnp.float32, transforms=attn_gpu.smem_transforms(V, jnp.float32)),
        plgpu.Barrier(num_barriers=1),
    )


def _forward(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg: _Config):
    """Padded inputs (``T`` a multiple of the chunk) -> ``(o [B, Tp, H, V], S [B, H, K, V])``;
    a ``[B, Tp, H, K]`` decay goes to ``gpu_vector.forward``."""
    if a_BTH.ndim == 4:
        from kernels.scan import gpu_vector  # it imports this module

        return gpu_vector.forward(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg)
    (B, Tp, G, K), (H, V), C = q_BTGK.shape, v_BTHV.shape[2:], cfg.chunk_size
    c_BHNC = jnp.cumsum(jnp.moveaxis(a_BTH, 1, 2).reshape(B, H, Tp // C, C), axis=-1)
    kernel = functools.partial(_kernel, cfg=cfg, R=H // G)
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((B, Tp, H, V), v_BTHV.dtype),
            jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
        ),
        grid=(B, H),
        grid_names=("b", "h"),
        compiler_params=COMPILER_PARAMS,
        interpret=attn_gpu._interpret_params() if cfg.interpret else None,
    )(q_BTGK, k_BTGK, v_BTHV, c_BHNC.reshape(B, H, Tp), c_BHNC[..., -1], s0_BHKV)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg: _Config):
    return _forward(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg)


def _scan_fwd(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg: _Config):
    out = _forward(q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV, cfg)
    return out, (q_BTGK, k_BTGK, v_BTHV, a_BTH, s0_BHKV)


def _scan_bwd(cfg: _Config, res, cotangents):
    f = functools.partial(reference.chunked_scan, chunk_size=cfg.chunk_size)
    _, vjp = jax.vjp(f, *res)
    return vjp(cotangents)


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size", "num_stages", "interpret"))
def chunked_scan(
    q_BTGK,
    k_BTGK,
    v_BTHV,
    log_decay_BTH,
    initial_state_BHKV=None,
    *,
    chunk_size: int = 64,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The chunked scan on Hopper (forward kernel; backward through the jnp chunked form).

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]``; v_BTHV: ``[B, T, H, V]``; ``G`` divides ``H``;
        promoted to one dtype, float16/bfloat16 with ``K`` and ``V`` multiples of 64 on the GPU.
      log_decay_BTH: ``[B, T, H]`` finite ``a_t <= 0``, used in float32; or ``[B, T, H, K]``,
        one per key dimension (``gpu_vector.py``).
      initial_state_BHKV: ``[B, H, K, V]`` or ``None`` (zeros).
      chunk_size: 64 on the GPU; ``T`` is zero-padded up to a multiple (``a = 0``, ``k = 0``).
      num_stages: TMA pipeline depth (chunks in flight).
      interpret: run in Mosaic GPU interpret mode (CPU).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: ``o`` in ``v``'s dtype, the state in float32.
    """
    cfg = _Config(chunk_size=chunk_size, num_stages=num_stages, interpret=bool(interpret))
    B, T, G, K = q_BTGK.shape
    H, V = v_BTHV.shape[2:]
    dtype = jnp.result_type(q_BTGK.dtype, k_BTGK.dtype, v_BTHV.dtype)
    if not interpret:
        if jnp.dtype(dtype) not in attn_gpu.WGMMA_DTYPES:
            raise ValueError(
                f"pallas_gpu chunked_scan needs float16 or bfloat16 inputs (wgmma), got {dtype}; "
                "cast, or use impl='xla'"
            )
        if K % 64 or V % 64:
            raise ValueError(f"pallas_gpu chunked_scan needs K and V multiples of 64, got {K}, {V}")
    q, k, v, a = reference.pad_to_chunks(
        q_BTGK.astype(dtype),
        k_BTGK.astype(dtype),
        v_BTHV.astype(dtype),
        log_decay_BTH.astype(jnp.float32),
        chunk_size,
    )
    if initial_state_BHKV is None:
        initial_state_BHKV = jnp.zeros((B, H, K, V), jnp.float32)
    o, sT = _scan(q, k, v, a, initial_state_BHKV.astype(jnp.float32), cfg)
    return o[:, :T].astype(v_BTHV.dtype), sT
