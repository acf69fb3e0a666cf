"""The chunked scan with one decay per key dimension (gated linear attention, Yang et al.,
arXiv:2312.06635) on Hopper: XLA intra-chunk scores, a Pallas Mosaic GPU kernel for the rest.

With ``c_t`` the within-chunk cumulative log decay (a ``[K]`` vector, ``c_t <= 0`` and
decreasing) and ``S`` the state entering the chunk, every factor below is ``<= 1``::

    o_t = sum_{s <= t} A_ts v_s + (q_t * exp(c_t)) S
    S  <- diag(exp(c_last)) S + sum_s (k_s * exp(c_last - c_s))^T v_s

Split of the work:
  wrapper (XLA, float32): ``c``; the rescaled copies ``q * exp(c)`` and ``k * exp(c_last - c)``
      and ``exp(c_last)``; and the intra-chunk scores ``A_ts = sum_d q_td k_sd exp(c_td - c_sd)``
      (``s <= t``), which do not factor over a whole chunk (``exp(-c_s)`` overflows). They go
      by GLA's secondary chunking (§4.3): sub-chunks of 16 tokens; a block of an earlier
      sub-chunk's keys is one matmul through the reference point ``r`` = the token before the
      query's sub-chunk (``exp(c_t - r)``, ``exp(r - c_s)`` both ``<= 1``); a diagonal block is
      computed pairwise over ``d`` (``[16, 16, K]``, exponent masked before ``exp``).
  kernel (one warpgroup per (batch, head), TMA pipeline over chunks of ``C = 64``, the
      ``[K, V]`` float32 state carried in registers): the wgmmas ``A v + (q exp(c)) S`` (one
      accumulator; ``S`` staged to SMEM in the input dtype) and ``(k w)^T v`` accumulated
      onto the per-row decayed state ``diag(exp(c_last)) S`` (an initialised accumulator, so
      ``K = V = 128`` holds one ``[128, 128]`` float32 tile of state, not two).

``A`` reaches the kernel in the input dtype (the scalar kernel casts its ``P`` the same way),
as ``[B, T, H, C]`` rows. Moving the scores into the kernel (per-sub-chunk rescaled tiles in
SMEM, the diagonal blocks in registers) is left for later. Limits and interpret mode as
``gpu.py``; the backward is the VJP of ``reference.chunked_scan_vector``. Validated in
interpret mode and by cross-lowering for CUDA (``tests/kernels/test_scan_gpu.py``); not yet
run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu as attn_gpu
from kernels.scan import gpu, reference


def sub_chunk(chunk_size: int) -> int:
    """Tokens per secondary chunk: ``reference.SUB_CHUNK`` (16) when it divides the chunk, else
    8 (interpret-mode chunks are multiples of 8)."""
    return reference.SUB_CHUNK if chunk_size % reference.SUB_CHUNK == 0 else 8


def intra_chunk_scores(q_BNHCK, k_BNHCK, c_BNHCK, Cs: int):
    """``A[..., t, s] = sum_d q_td k_sd exp(c_td - c_sd)`` for ``s <= t``, else 0, in float32,
    with no positive exponent (module docstring): ``[B, N, H, C, C]``."""
    B, N, H, C, K = q_BNHCK.shape
    Ns = C // Cs
    sub = (B, N, H, Ns, Cs, K)
    q_I, k_I, c_I = (x.reshape(sub) for x in (q_BNHCK, k_BNHCK, c_BNHCK))
    # r_i: cumulative decay at the token before sub-chunk i (0 before the chunk).
    r_BNHIK = jnp.pad(c_I[..., :-1, -1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])
    qr_BNHIJK = q_I * jnp.exp(c_I - r_BNHIK[..., None, :])
    earlier_IS = (jnp.arange(C)[None, :] < (jnp.arange(Ns) * Cs)[:, None])[:, :, None]
    expo = jnp.where(earlier_IS, r_BNHIK[..., :, None, :] - c_BNHCK[..., None, :, :], 0.0)
    kr_BNHISK = jnp.where(earlier_IS, jnp.exp(expo), 0.0) * k_BNHCK[..., None, :, :]
    A_BNHIJS = jnp.einsum("bnhijk,bnhisk->bnhijs", qr_BNHIJK, kr_BNHISK)

    tri = jnp.tril(jnp.ones((Cs, Cs), bool))[:, :, None]
    diff = c_I[..., :, None, :] - c_I[..., None, :, :]
    decay_BNHITSK = jnp.where(tri, jnp.exp(jnp.where(tri, diff, 0.0)), 0.0)
    # Elementwise then a sum over d (not an einsum), which XLA may fuse into the reduction.
    qk_BNHITSK = q_I[..., :, None, :] * k_I[..., None, :, :]
    diag_BNHITS = jnp.sum(qk_BNHITSK * decay_BNHITSK, axis=-1)
    A_BNHIJS += jnp.einsum("bnhits,ij->bnhitjs", diag_BNHITS, jnp.eye(Ns)).reshape(A_BNHIJS.shape)
    return A_BNHIJS.reshape(B, N, H, C, C)


def _mma(products, shape, init=None, *, interpreting: bool):
    """``init + sum(op(a) @ op(b))`` in float32 over ``products`` of ``(a, b, ta)`` SMEM refs
    (``ta``: ``a`` read transposed), chained into one wgmma accumulator: no extra registers
    for a second accumulator or an ``init`` held beside it."""
    if interpreting:
        dims = lambda ta: (((0 if ta else 1,), (0,)), ((), ()))  # noqa: E731
        out = [
            jax.lax.dot_general(a[...], b[...], dims(ta), preferred_element_type=jnp.float32)
            for a, b, ta in products
        ]
        return sum(out[1:], out[0] if init is None else init + out[0])

    def mma(acc_ref):
        for a, b, ta in products:
            plgpu.wgmma(acc_ref, plgpu.transpose_ref(a, (1, 0)) if ta else a, b)

    if init is not None:  # a preinitialised accumulator needs run_state (it returns the ref)
        return pl.run_state(mma)(plgpu.ACC.init(init))
    return pl.run_scoped(
        lambda acc_ref: mma(acc_ref) or acc_ref[...], plgpu.ACC(shape, jnp.float32)
    )


def _kernel(p_ref, qe_ref, kw_ref, v_ref, e_ref, s0_ref, o_ref, sT_ref, *, cfg: gpu._Config):
    interpreting = cfg.interpret
    L = plgpu.Layout.WGMMA
    ROW = L.reduce(1)  # a value per row of a WGMMA tile
    b, h = jax.lax.axis_index("b"), jax.lax.axis_index("h")
    C, K, V = cfg.chunk_size, qe_ref.shape[3], v_ref.shape[3]
    dtype = qe_ref.dtype
    mma = functools.partial(_mma, interpreting=interpreting)

    def load(ref, layout):
        return ref[...] if interpreting else plgpu.load(ref, (), layout=layout)

    f32_smem = plgpu.SMEM((K, V), jnp.float32, transforms=attn_gpu.smem_transforms(V, jnp.float32))

    # The float32 staging buffer lives only around the pipeline (its SMEM is reused there).
    def load_state(f32_smem, barrier):
        plgpu.copy_gmem_to_smem(s0_ref.at[b, h], f32_smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        return load(f32_smem, L)

    S0 = pl.run_scoped(load_state, f32_smem, plgpu.Barrier(num_barriers=1))

    def pipeline(s_smem, o_smem):
        def body(indices, p_smem, qe_smem, kw_smem, v_smem, e_smem, S):
            (n,) = indices
            e = jax.lax.broadcast_in_dim(load(e_smem, ROW), (K, V), (0,))
            s_smem[...] = S.astype(dtype)
            plgpu.commit_smem()
            o = mma([(p_smem, v_smem, False), (qe_smem, s_smem, False)], (C, V))
            S = mma([(kw_smem, v_smem, True)], (K, V), init=e * S)  # the decayed state
            plgpu.wait_smem_to_gmem(0)  # the previous chunk's output has left o_smem
            o_smem[...] = o.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(n * C, C), h])
            return S

        def tile(width):  # interpret mode: no swizzle, so chunks such as 40 tile too
            swizzle = () if interpreting else attn_gpu.smem_transforms(width, dtype)
            return plgpu.BlockSpec((C, width), lambda n: (n, 0), transforms=swizzle)

        S = plgpu.emit_pipeline(
            body,
            grid=(e_ref.shape[2] // K,),
            in_specs=[tile(C), tile(K), tile(K), tile(V), plgpu.BlockSpec((K,), lambda n: (n,))],
            max_concurrent_steps=cfg.num_stages,
            init_carry=S0,
        )(
            p_ref.at[b, :, h, :],
            qe_ref.at[b, :, h, :],
            kw_ref.at[b, :, h, :],
            v_ref.at[b, :, h, :],
            e_ref.at[b, h],
        )
        plgpu.wait_smem_to_gmem(0)
        return S

    S = pl.run_scoped(
        pipeline,
        plgpu.SMEM((K, V), dtype, transforms=attn_gpu.smem_transforms(V, dtype)),
        plgpu.SMEM((C, V), o_ref.dtype, transforms=attn_gpu.smem_transforms(V, o_ref.dtype)),
    )

    def store_state(f32_smem):
        f32_smem[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f32_smem, sT_ref.at[b, h])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store_state, f32_smem)


def forward(q_BTGK, k_BTGK, v_BTHV, a_BTHK, s0_BHKV, cfg: gpu._Config):
    """Padded inputs (``T`` a multiple of the chunk) -> ``(o [B, Tp, H, V], S [B, H, K, V])``."""
    (B, Tp, _, K), (H, V), C = q_BTGK.shape, v_BTHV.shape[2:], cfg.chunk_size
    N, dtype, f32 = Tp // C, v_BTHV.dtype, jnp.float32

    def chunks(x_BTHX):  # [B, N, H, C, X] in float32, groups repeated to heads
        x = reference._heads(x_BTHX.astype(f32), H)
        return jnp.moveaxis(x.reshape(B, N, C, H, -1), 2, 3)

    def rows(x_BNHCX):  # back to [B, Tp, H, X] in the input dtype
        return jnp.moveaxis(x_BNHCX, 3, 2).reshape(B, Tp, H, -1).astype(dtype)

    q_BNHCK, k_BNHCK = chunks(q_BTGK), chunks(k_BTGK)
    c_BNHCK = jnp.cumsum(chunks(a_BTHK), axis=3)
    c_last_BNHK = c_BNHCK[..., -1, :]
    A_BNHCC = intra_chunk_scores(q_BNHCK, k_BNHCK, c_BNHCK, sub_chunk(C))
    qe_BNHCK = q_BNHCK * jnp.exp(c_BNHCK)
    kw_BNHCK = k_BNHCK * jnp.exp(c_last_BNHK[..., None, :] - c_BNHCK)
    e_BHNK = jnp.moveaxis(jnp.exp(c_last_BNHK), 1, 2)
    return plgpu.kernel(
        functools.partial(_kernel, cfg=cfg),
        out_type=(
            jax.ShapeDtypeStruct((B, Tp, H, V), dtype),
            jax.ShapeDtypeStruct((B, H, K, V), f32),
        ),
        grid=(B, H),
        grid_names=("b", "h"),
        compiler_params=gpu.COMPILER_PARAMS,
        interpret=attn_gpu._interpret_params() if cfg.interpret else None,
    )(
        rows(A_BNHCC),
        rows(qe_BNHCK),
        rows(kw_BNHCK),
        v_BTHV,
        e_BHNK.reshape(B, H, N * K),
        s0_BHKV,
    )
