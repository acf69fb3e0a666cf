"""Weight-only quantized matmul as a Pallas Mosaic GPU (Hopper) kernel.

``y [M, N] = x [M, K] @ dequantize(qw) [K, N]`` for int8, int4 (two per byte) and fp8 e4m3
weights (``reference.QuantizedWeight``), per-channel or grouped scales, float16 / bfloat16
``x``. The weight tiles travel through a ``plgpu.emit_pipeline`` TMA pipeline in their stored
bytes (int8, packed uint8 viewed as int8, float8) and are dequantized in registers.

Layout: the kernel computes the transpose, ``out^T [N, M] = W^T [N, K] @ x^T [K, M]`` (as the
Machete / Marlin-style mixed-input GEMMs do), so the dequantized weight tile is the *register*
A operand of the warpgroup MMA and ``x^T`` its SMEM B operand (``x``'s ``[bm, bk]`` tile is
K-major, which is what B wants, so no transpose is done anywhere). ``M`` is then the wgmma's N
dimension (a multiple of 8 up to 256): a decode ``M = 16`` costs a 16-wide MMA instead of being
padded to the 64 rows of a wgmma, and the dequantized tile never goes back to SMEM. The
``[bk, bn]`` weight tile is read from SMEM transposed straight into the
``WGMMA_TRANSPOSED`` register layout, converted to 16 bits, then moved to the ``WGMMA`` layout
(one shuffle per register pair) that a register A operand needs.

Per K step ``_matmul`` (``kernels.attention.gpu``) gives the partial product of the tile in a
fresh float32 accumulator; it is scaled per output row of ``out^T`` (the weight's columns) by
the tile's scale row and added to the float32 carry. One code path serves both scale kinds:
per channel the scale row is the same every step, grouped it is the row of the tile's group
(a tile lies inside one group: ``group_size % block_k == 0``).

int4: the packed bytes ``[bk / 2, bn]`` hold rows ``2i`` (low nibble) and ``2i + 1`` (high
nibble) of the tile. Mosaic GPU has no arithmetic on 8-bit registers (bitwise only), so the
bytes are widened to int16 (sign-extending) and the nibbles are ``(b << 12) >> 12`` and
``b >> 4`` (arithmetic shifts). The two nibble planes are not interleaved in registers;
instead the wrapper splits ``x`` into its even and odd columns and the kernel runs two MMAs,
``lo^T @ x_even^T + hi^T @ x_odd^T``. HBM carries 4-bit weights.

fp8: float8 e4m3 converts to float16 in hardware; a bfloat16 ``x`` takes the float32 detour
Mosaic GPU asks for (the PTX of this ptxas has no e4m3 -> bf16).

W8A8 (``activations="int8"`` / ``"fp8"``) runs the 8-bit x 8-bit kernel of ``gpu_w8a8.py``
(``matmul`` here forwards to it).

Shapes that are not block multiples are padded in the wrapper (a copy of the weight only
then) and the output sliced. Interpret mode (CPU) swaps the wgmmas for float32 dot_generals and
skips layout casts, like ``kernels.attention.gpu``; float32 ``x`` is allowed there only.
Validated in interpret mode and by cross-lowering for CUDA (``tests/kernels/test_quant_gpu.py``);
block sizes are unmeasured defaults. Example::

    y_MN = matmul(x_MK, quantize(w_KN, "int4", group_size=128), interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu
from kernels.quant import gpu_w8a8, reference

_MAX_BOX = 256  # the largest TMA box dimension, and the largest wgmma N
_SMEM_LIMIT = 227 * 1024  # per block on H100
_W_DTYPES = {"int8": jnp.int8, "int4": jnp.int8, "fp8": reference.FP8}  # as fetched by TMA


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU quantized matmul (``out^T = W^T x^T``).

    Attributes:
      block_m: rows of ``x`` per program (the wgmma N dimension): a multiple of 8, <= 256.
      block_n: weight columns per program (the wgmma M dimension): a multiple of 64, <= 256.
      block_k: contraction rows per pipeline step: a multiple of 64 (of 128 for int4, whose
        tile is split into even and odd rows), <= 256; grouped scales need
        ``group_size % block_k == 0``.
      num_stages: SMEM buffers of the TMA pipeline (copies in flight).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4

    def __post_init__(self):
        for name, multiple in (("block_m", 8), ("block_n", 64), ("block_k", 64)):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % multiple or b > _MAX_BOX:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} and <= {_MAX_BOX}, got {b!r}"
                )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")

    @classmethod
    def for_shape(cls, M: int, K: int, N: int) -> BlockSizes:
        """Decode (``M <= 64``): ``block_m`` = ``M`` rounded up to 8, 128 x 128 weight tiles
        (16 KiB of int8), four stages, ``N / 128`` programs (224 at N = 28672: ~1.7 waves on
        132 SMs). Prefill: 128 x 128 output tiles, 128-row K steps, three stages. Unmeasured."""
        del K, N
        if M <= 64:
            return cls(block_m=max(8, -(-M // 8) * 8), block_n=128, block_k=128, num_stages=4)
        return cls(block_m=128, block_n=128, block_k=128, num_stages=3)

    def check(self, qw: reference.QuantizedWeight) -> None:
        """Raises ``ValueError`` when these blocks do not fit the weight's scheme or groups."""
        if qw.scheme == "int4" and self.block_k % 128:
            raise ValueError(f"int4 needs block_k a multiple of 128, got {self.block_k}")
        if qw.group_size is not None and qw.group_size % self.block_k:
            raise ValueError(
                f"group_size={qw.group_size} must be a multiple of block_k={self.block_k} "
                f"(a K tile takes one scale row)"
            )


def smem_bytes(bs: BlockSizes, scheme: str, x_dtype) -> int:
    """SMEM of one program: per stage the ``x`` tile, the weight tile in its stored bytes and a
    scale row; the output tile; ~3 KiB of barriers and alignment."""
    x_item = jnp.dtype(x_dtype).itemsize
    w_rows = bs.block_k // 2 if scheme == "int4" else bs.block_k
    stage = bs.block_m * bs.block_k * x_item + w_rows * bs.block_n + 4 * bs.block_n
    return bs.num_stages * stage + bs.block_m * bs.block_n * x_item + 3 * 1024


def _load_weight_T(w_smem, interpreting: bool):
    """The ``[bk, bn]`` stored tile as ``[bn, bk]`` registers (``WGMMA_TRANSPOSED`` on GPU)."""
    if interpreting:
        return w_smem[...].T
    return plgpu.load(plgpu.transpose_ref(w_smem, (1, 0)), (), layout=plgpu.Layout.WGMMA_TRANSPOSED)


def _to_operand(w_NK, dtype, interpreting: bool):
    """Converted weight values as a wgmma register A operand in ``dtype``."""
    if jnp.issubdtype(w_NK.dtype, jnp.floating) and jnp.dtype(dtype) != jnp.float16:
        w_NK = w_NK.astype(jnp.float32)  # no e4m3 -> bf16 conversion in hardware
    w_NK = w_NK.astype(dtype)
    return w_NK if interpreting else plgpu.layout_cast(w_NK, plgpu.Layout.WGMMA)


def _kernel(*refs, scheme: str, num_steps: int, rows_per_scale: int, bs: BlockSizes, interpret):
    *x_refs, w_ref, s_ref, o_ref = refs
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    n, m = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    L = plgpu.Layout.WGMMA
    dtype = o_ref.dtype
    x_spec = plgpu.BlockSpec(
        (bm, x_refs[0].shape[1] // num_steps),
        lambda k: (m, k),
        transforms=gpu.smem_transforms(x_refs[0].shape[1] // num_steps, dtype),
    )
    w_rows = w_ref.shape[0] // num_steps
    w_spec = plgpu.BlockSpec(
        (w_rows, bn), lambda k: (k, n), transforms=gpu.smem_transforms(bn, w_ref.dtype)
    )
    s_spec = plgpu.BlockSpec((1, bn), lambda k: (k * bk // rows_per_scale, n))

    def body(indices, *smem):
        *x_smem, w_smem, s_smem, acc = smem
        w = _load_weight_T(w_smem, interpret)
        if scheme == "int4":
            w = w.astype(jnp.int16)  # sign-extends; no arithmetic on 8-bit registers
            planes = (jnp.right_shift(jnp.left_shift(w, 12), 12), jnp.right_shift(w, 4))
        else:
            planes = (w,)
        part = None
        for plane, xs in zip(planes, x_smem, strict=True):
            a = _to_operand(plane, dtype, interpret)
            p = gpu._matmul(a, xs, transpose_b=True, interpreting=interpret)
            part = p if part is None else part + p
        s = s_smem[0, :] if interpret else plgpu.load(s_smem, (0,), layout=L.reduce(1))
        return acc + part * jax.lax.broadcast_in_dim(s, part.shape, (0,))

    def scoped(o_smem):
        init = jnp.zeros((bn, bm), jnp.float32)
        init = init if interpret else plgpu.layout_cast(init, L)
        acc = plgpu.emit_pipeline(
            body,
            grid=(num_steps,),
            in_specs=[x_spec] * len(x_refs) + [w_spec, s_spec],
            max_concurrent_steps=bs.num_stages,
            init_carry=init,
        )(*x_refs, w_ref, s_ref)
        out = acc.astype(dtype)
        if interpret:
            o_smem[...] = out.T
        else:  # the transposed register layout stores [bn, bm] into the [bm, bn] tile
            out = plgpu.layout_cast(out, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.transpose_ref(o_smem, (1, 0))[...] = out
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(m * bm, bm), pl.ds(n * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((bm, bn), dtype, transforms=gpu.smem_transforms(bn, dtype)))


@functools.partial(jax.jit, static_argnames=("activations", "block_sizes", "interpret"))
def matmul(
    x_MK,
    qw: reference.QuantizedWeight,
    *,
    activations: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """``x @ dequantize(qw)`` on Hopper with the weight dequantized in registers.

    Args:
      x_MK: float16 or bfloat16 activations (float32 in interpret mode only).
      qw: an int8 / int4 / fp8 ``QuantizedWeight`` of shape ``(K, N)``, per-channel or grouped.
      activations: ``None``, or ``"int8"`` / ``"fp8"`` for W8A8 (``gpu_w8a8.matmul``).
      block_sizes: ``BlockSizes`` (``gpu_w8a8.BlockSizes`` for W8A8); default from the shape.
      interpret: run in Mosaic GPU interpret mode (CPU).

    Returns:
      ``[M, N]`` in the dtype of ``x``, float32 accumulation.
    """
    reference.check_matmul(x_MK, qw, activations)
    if activations is not None:
        return gpu_w8a8.matmul(
            x_MK, qw, activations=activations, block_sizes=block_sizes, interpret=interpret
        )
    if not interpret and jnp.dtype(x_MK.dtype) not in gpu.WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu quant matmul needs float16 or bfloat16 x (wgmma), got {x_MK.dtype}; "
            f"cast, or use impl='xla'"
        )
    M, K = x_MK.shape
    N = qw.shape[1]
    bs = block_sizes or BlockSizes.for_shape(M, K, N)
    bs.check(qw)
    if not interpret and smem_bytes(bs, qw.scheme, x_MK.dtype) > _SMEM_LIMIT:
        raise ValueError(
            f"{bs} needs {smem_bytes(bs, qw.scheme, x_MK.dtype)} bytes of SMEM for "
            f"{qw.scheme}, over {_SMEM_LIMIT}; use fewer stages or smaller blocks"
        )
    Mp, Kp, Np = (pl.cdiv(d, b) * b for d, b in ((M, bs.block_m), (K, bs.block_k), (N, bs.block_n)))
    x = reference.pad_to(x_MK, (Mp, Kp))
    w_rows = Kp // 2 if qw.scheme == "int4" else Kp
    values = qw.values
    if qw.scheme == "int4":
        values = jax.lax.bitcast_convert_type(values, jnp.int8)  # same bytes, signed nibbles
        x = jnp.moveaxis(x.reshape(Mp, Kp // 2, 2), 2, 0)  # [2, Mp, Kp / 2]: even, odd columns
        xs = (x[0], x[1])
    else:
        xs = (x,)
    w = reference.pad_to(values.astype(_W_DTYPES[qw.scheme]), (w_rows, Np))
    scales = reference.pad_to(qw.scales, (qw.scales.shape[0], Np), 1.0)
    kernel = functools.partial(
        _kernel,
        scheme=qw.scheme,
        num_steps=Kp // bs.block_k,
        rows_per_scale=Kp if qw.group_size is None else qw.group_size,
        bs=bs,
        interpret=bool(interpret),
    )
    out_MN = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((Mp, Np), x_MK.dtype),
        grid=(Np // bs.block_n, Mp // bs.block_m),
        grid_names=("n", "m"),
        interpret=gpu._interpret_params() if interpret else None,
    )(*xs, w, scales)
    return out_MN[:M, :N]
