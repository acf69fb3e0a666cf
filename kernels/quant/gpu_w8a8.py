"""W8A8 quantized matmul as a Pallas Mosaic GPU (Hopper) kernel: 8-bit x 8-bit warpgroup MMAs.

``y [M, N] = (xq [M, K] @ wq [K, N]) * xs [M, 1] * ws [1, N]``: ``x`` quantized per row with
dynamic scales (``reference.quantize_rows``), the weight per output channel. int8 values
multiply into an int32 accumulator (exact, as ``reference.matmul`` computes it), float8 e4m3
into float32. Hopper's 8-bit MMAs run at twice the bf16 rate (1979 vs 989 dense TFLOP/s on an
H100 SXM, NVIDIA H100 datasheet), so a compute-bound prefill GEMM can gain up to 2x.

Layout: Mosaic GPU lowers an 8-bit wgmma only with both SMEM operands K-major. ``xq``'s
``[bm, bk]`` tile is; the ``[K, N]`` weight is N-major, so the wrapper hands the kernel
``W^T [N, K]`` (one XLA transpose of the int8 values per call: K N bytes read and written, 3% of
an 8192^3 GEMM's time at the H100's bandwidth; a server would keep the transposed copy) and the
kernel passes its ``[bn, bk]`` tile to the MMA through ``transpose_ref``. Per output tile a TMA
pipeline streams ``(x, W^T)`` K-steps; each step's wgmma accumulates in place into the carried
accumulator; the epilogue applies both scales in registers (the row and column scales arrive by
TMA into SMEM while the pipeline runs) and writes the ``[bm, bn]`` tile in the dtype of ``x``.

Interpret mode (CPU) replaces the wgmma by an integer / float32 ``dot_general``. Validated in
interpret mode and by cross-lowering for CUDA (``tests/kernels/test_quant_gpu.py``); not yet run
on an H100 (block sizes are unmeasured defaults).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu
from kernels.quant import reference

_SMEM_LIMIT = 227 * 1024  # per block on H100
_ACC = {"int8": jnp.int32, "fp8": jnp.float32}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the W8A8 kernel.

    Attributes:
      block_m: rows of ``x`` per program (the wgmma M): 64 or 128.
      block_n: weight columns per program (the wgmma N): a multiple of 64, <= 256; the int32
        accumulator holds ``block_m * block_n / 128`` registers per thread.
      block_k: contraction per pipeline step: a multiple of 128 (one 128-byte swizzle row of
        8-bit values), <= 256.
      num_stages: SMEM buffers of the TMA pipeline.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m must be 64 or 128, got {self.block_m!r}")
        for name, multiple in (("block_n", 64), ("block_k", 128)):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % multiple or b > 256:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} and <= 256, got {b!r}"
                )
        if self.block_m * self.block_n > 128 * 128:
            raise ValueError(
                f"a {self.block_m} x {self.block_n} accumulator needs more than 128 registers "
                f"per thread of one warpgroup; keep block_m * block_n <= 16384"
            )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")

    @classmethod
    def for_shape(cls, M: int) -> BlockSizes:
        """128 x 128 tiles with 4 stages (64 KiB of 8-bit tiles in flight); 64-row tiles when
        ``M <= 64`` so decode-sized ``x`` is not padded to 128 rows. Unmeasured."""
        return cls(block_m=64 if M <= 64 else 128, block_n=128, block_k=128, num_stages=4)


def smem_bytes(bs: BlockSizes, x_dtype) -> int:
    """Per stage the 8-bit ``x`` and ``W^T`` tiles; the output tile; both scale rows and ~1 KiB
    of barriers."""
    stage = (bs.block_m + bs.block_n) * bs.block_k
    out = bs.block_m * bs.block_n * jnp.dtype(x_dtype).itemsize
    return bs.num_stages * stage + out + 4 * (bs.block_m + bs.block_n) + 1024


def _kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, num_steps, bs: BlockSizes, interpret):
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    n, m = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    L = plgpu.Layout.WGMMA
    acc_dtype = jnp.int32 if x_ref.dtype == jnp.int8 else jnp.float32

    def body(indices, x_smem, w_smem, acc):
        del indices
        if interpret:
            dims = (((1,), (1,)), ((), ()))
            return acc + jax.lax.dot_general(
                x_smem[...], w_smem[...], dims, preferred_element_type=acc_dtype
            )

        def mma(acc_ref):
            plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(w_smem, (1, 0)))

        return pl.run_state(mma)(plgpu.ACC.init(acc))

    def scoped(o_smem, xs_smem, ws_smem, barrier):
        plgpu.copy_gmem_to_smem(xs_ref.at[pl.ds(m * bm, bm)], xs_smem, barrier.at[0])
        plgpu.copy_gmem_to_smem(ws_ref.at[pl.ds(n * bn, bn)], ws_smem, barrier.at[0])
        spec = lambda rows, index: plgpu.BlockSpec(
            (rows, bk), index, transforms=gpu.smem_transforms(bk, x_ref.dtype)
        )
        init = jnp.zeros((bm, bn), acc_dtype)
        acc = plgpu.emit_pipeline(
            body,
            grid=(num_steps,),
            in_specs=[spec(bm, lambda k: (m, k)), spec(bn, lambda k: (n, k))],
            max_concurrent_steps=bs.num_stages,
            init_carry=init if interpret else plgpu.layout_cast(init, L),
        )(x_ref, w_ref)
        plgpu.barrier_wait(barrier.at[0])
        if interpret:
            xs, ws = xs_smem[...], ws_smem[...]
        else:
            xs = plgpu.load(xs_smem, (), layout=L.reduce(1))
            ws = plgpu.load(ws_smem, (), layout=L.reduce(0))
        out = acc.astype(jnp.float32) * jax.lax.broadcast_in_dim(xs, (bm, bn), (0,))
        o_smem[...] = (out * jax.lax.broadcast_in_dim(ws, (bm, bn), (1,))).astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(m * bm, bm), pl.ds(n * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    dtype = o_ref.dtype
    pl.run_scoped(
        scoped,
        plgpu.SMEM((bm, bn), dtype, transforms=gpu.smem_transforms(bn, dtype)),
        plgpu.SMEM((bm,), jnp.float32),
        plgpu.SMEM((bn,), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=1),
    )


@functools.partial(jax.jit, static_argnames=("activations", "block_sizes", "interpret"))
def matmul(
    x_MK,
    qw: reference.QuantizedWeight,
    *,
    activations: str,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """``x @ dequantize(qw)`` with ``x`` quantized per row and an 8-bit x 8-bit MMA.

    Args:
      x_MK: float16 / bfloat16 activations (float32 in interpret mode only).
      qw: a per-channel ``QuantizedWeight`` of scheme ``activations``, shape ``(K, N)``.
      activations: ``"int8"`` (int32 accumulation) or ``"fp8"`` (e4m3, float32 accumulation).
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape(M)``.
      interpret: run in Mosaic GPU interpret mode (CPU).

    Returns:
      ``[M, N]`` in the dtype of ``x``; equal to ``reference.matmul(..., activations=...)`` up
      to float32 rounding of the scales.
    """
    reference.check_matmul(x_MK, qw, activations)
    if activations is None:
        raise ValueError("gpu_w8a8.matmul is the W8A8 path; pass activations='int8' or 'fp8'")
    if not interpret and jnp.dtype(x_MK.dtype) not in gpu.WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu W8A8 matmul returns float16 or bfloat16, got x of {x_MK.dtype}; cast, "
            f"or use impl='xla'"
        )
    M, K = x_MK.shape
    N = qw.shape[1]
    bs = block_sizes or BlockSizes.for_shape(M)
    if not interpret and smem_bytes(bs, x_MK.dtype) > _SMEM_LIMIT:
        raise ValueError(
            f"{bs} needs {smem_bytes(bs, x_MK.dtype)} bytes of SMEM, over {_SMEM_LIMIT}; use "
            f"fewer stages or smaller blocks"
        )
    Mp, Kp, Np = (pl.cdiv(d, b) * b for d, b in ((M, bs.block_m), (K, bs.block_k), (N, bs.block_n)))
    xq_MK, xs_M1 = reference.quantize_rows(x_MK, activations)
    # Zero padding is exact: padded rows/columns multiply to zero and are sliced off.
    xq = reference.pad_to(xq_MK, (Mp, Kp))
    wT = reference.pad_to(qw.values.T, (Np, Kp))
    xs = reference.pad_to(xs_M1[:, 0], (Mp,), 1.0)
    ws = reference.pad_to(qw.scales[0], (Np,), 1.0)
    kernel = functools.partial(
        _kernel, num_steps=Kp // bs.block_k, bs=bs, interpret=bool(interpret)
    )
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((Mp, Np), x_MK.dtype),
        grid=(Np // bs.block_n, Mp // bs.block_m),
        grid_names=("n", "m"),
        interpret=gpu._interpret_params() if interpret else None,
    )(xq, wT, xs, ws)
    return out[:M, :N]
