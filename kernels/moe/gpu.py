"""Grouped matmul (dropless MoE) as a Pallas Mosaic GPU (Hopper) kernel.

One program per ``[block_m, block_n]`` output tile. The row tile's visits (``tpu.make_visits``:
one per group with rows in the tile, ordered by group) are a contiguous range of the visit
list; the program runs one TMA pipeline over ``visits x K steps`` (a dynamic length read from
the metadata), each step a warpgroup MMA of the ``x`` tile with the visit's weight tile into a
fresh float32 accumulator that is added to the register carry with the rows of other groups
selected away (no select when the group covers the whole tile). Row tiles past
``sum(group_sizes)`` have no visits and write zeros.

The backward's ``dx = dy @ w[g]^T`` is the same kernel reading the weight tiles transposed
(the wgmma's transposed SMEM B operand); ``dw[e] = x_e^T dy_e`` is XLA's transpose of
``jax.lax.ragged_dot`` (no Mosaic GPU transposed grouped matmul yet).

Shapes are padded in the wrapper (``K`` and ``N`` to multiples of both ``block_k`` and
``block_n``, which ``dx`` swaps). Interpret mode (CPU) swaps the wgmmas for float32
``dot_general``s and skips layout casts, like ``kernels.attention.gpu``; float32 inputs are
allowed there only. Validated in interpret mode and by cross-lowering for CUDA
(``tests/kernels/test_moe_gmm.py``); block sizes are unmeasured defaults. Example::

    out_MN = grouped_matmul(x_MK, w_EKN, group_sizes_E, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.attention import gpu as attn_gpu
from kernels.moe import reference
from kernels.moe.tpu import make_visits

_MAX_BOX = 256  # the largest TMA box dimension, and the largest wgmma N
_SMEM_LIMIT = 227 * 1024  # per block on H100


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the GPU grouped matmul.

    Attributes:
      block_m: rows per program (the wgmma M): 64 or 128.
      block_n: output columns per program (the wgmma N): a multiple of 64, <= 256.
      block_k: contraction per pipeline step: a multiple of 64, <= 256.
      num_stages: SMEM buffers of the TMA pipeline (copies in flight).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_stages: int = 4

    def __post_init__(self):
        if self.block_m not in (64, 128) or isinstance(self.block_m, bool):
            raise ValueError(f"block_m must be 64 or 128, got {self.block_m!r}")
        for name in ("block_n", "block_k"):
            b = getattr(self, name)
            if not isinstance(b, int) or b <= 0 or b % 64 or b > _MAX_BOX:
                raise ValueError(f"{name} must be a positive multiple of 64 and <= 256, got {b!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {self.num_stages!r}")

    @classmethod
    def for_shape(cls, M: int, E: int) -> BlockSizes:
        """``block_m = 64`` when groups average under 128 rows (less work wasted on the rows
        of other groups), else 128; 128-wide output tiles, 64-deep K steps, four stages."""
        return cls(block_m=64 if M < 128 * E else 128)


def smem_bytes(bs: BlockSizes, dtype) -> int:
    """Per stage an ``x`` and a weight tile; the output tile; ~3 KiB of barriers."""
    item = jnp.dtype(dtype).itemsize
    stage = (bs.block_m + bs.block_n) * bs.block_k * item
    return bs.num_stages * stage + bs.block_m * bs.block_n * item + 3 * 1024


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call (hashable: ``custom_vjp`` non-diff argument)."""

    M: int
    block_sizes: BlockSizes
    interpret: bool


def _tile_visits(group_sizes_E, *, M: int, bm: int, num_tiles: int):
    """``(group, lo, hi)`` per visit and ``(start, count)`` per row tile: the tile's visits are
    ``start .. start + count - 1``, rows ``[lo, hi)`` of the tile belonging to ``group``."""
    meta = make_visits(group_sizes_E, M=M, tm=bm, num_tiles=num_tiles, by_group=False)
    # Computing visits come first, sorted by tile; the rest sort after every tile.
    real = jnp.where((meta.flags & 4) != 0, meta.tile, num_tiles)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    start = jnp.searchsorted(real, tiles, side="left").astype(jnp.int32)
    count = jnp.searchsorted(real, tiles, side="right").astype(jnp.int32) - start
    return meta.group, meta.lo, meta.hi, start, count


def _kernel(
    group_ref, lo_ref, hi_ref, start_ref, count_ref, x_ref, w_ref, o_ref, *,
    nk: int, w_tiles: int, bs: BlockSizes, transpose_rhs: bool, interpret: bool,
):  # fmt: skip
    """``w_ref`` is ``[E * rows, cols]``: ``w_tiles`` block rows per group."""
    _cast = (lambda v, layout: v) if interpret else plgpu.layout_cast
    L = plgpu.Layout.WGMMA
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    n, t = jax.lax.axis_index("n"), jax.lax.axis_index("m")
    start, count = start_ref[t], count_ref[t]
    dtype = x_ref.dtype

    def w_index(s):
        g, k = group_ref[start + s // nk], s % nk
        return (g * w_tiles + n, k) if transpose_rhs else (g * w_tiles + k, n)

    x_spec = plgpu.BlockSpec(
        (bm, bk), lambda s: (t, s % nk), transforms=attn_gpu.smem_transforms(bk, dtype)
    )
    w_block = (bn, bk) if transpose_rhs else (bk, bn)
    w_spec = plgpu.BlockSpec(
        w_block, w_index, transforms=attn_gpu.smem_transforms(w_block[1], dtype)
    )
    rows = _cast(jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0), L)

    def body(indices, x_smem, w_smem, acc):
        (s,) = indices
        v = start + s // nk
        lo, hi = lo_ref[v], hi_ref[v]
        part = attn_gpu._matmul(x_smem, w_smem, transpose_b=transpose_rhs, interpreting=interpret)
        return jax.lax.cond(
            (lo == 0) & (hi == bm),
            lambda: acc + part,
            lambda: acc + jnp.where((rows >= lo) & (rows < hi), part, 0.0),
        )

    def scoped(o_smem):
        acc = plgpu.emit_pipeline(
            body,
            grid=(count * nk,),
            in_specs=[x_spec, w_spec],
            max_concurrent_steps=bs.num_stages,
            init_carry=_cast(jnp.zeros((bm, bn), jnp.float32), L),
        )(x_ref, w_ref)
        o_smem[...] = acc.astype(o_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(t * bm, bm), pl.ds(n * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped, plgpu.SMEM((bm, bn), o_ref.dtype, transforms=attn_gpu.smem_transforms(bn, dtype))
    )


def gmm(x_MK, w_EKN, group_sizes_E, cfg: _Config, *, transpose_rhs: bool = False):
    """Padded grouped matmul ``[Mp, Np]`` of ``x [Mp, Kp]`` with ``w [E, Kp, Np]``, or with
    ``w [E, Np, Kp]`` read transposed when ``transpose_rhs``."""
    bs = cfg.block_sizes
    (Mp, Kp), E = x_MK.shape, w_EKN.shape[0]
    Np = w_EKN.shape[1] if transpose_rhs else w_EKN.shape[2]
    num_tiles, nk = Mp // bs.block_m, Kp // bs.block_k
    meta = _tile_visits(group_sizes_E, M=cfg.M, bm=bs.block_m, num_tiles=num_tiles)
    kernel = functools.partial(
        _kernel,
        nk=nk,
        w_tiles=(Np // bs.block_n) if transpose_rhs else nk,
        bs=bs,
        transpose_rhs=transpose_rhs,
        interpret=cfg.interpret,
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((Mp, Np), x_MK.dtype),
        grid=(Np // bs.block_n, num_tiles),
        grid_names=("n", "m"),
        interpret=attn_gpu._interpret_params() if cfg.interpret else None,
    )(*meta, x_MK, w_EKN.reshape(E * w_EKN.shape[1], w_EKN.shape[2]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x_MK, w_EKN, group_sizes_E, cfg: _Config):
    return gmm(x_MK, w_EKN, group_sizes_E, cfg)


def _grouped_matmul_fwd(x_MK, w_EKN, group_sizes_E, cfg: _Config):
    return gmm(x_MK, w_EKN, group_sizes_E, cfg), (x_MK, w_EKN, group_sizes_E)


def _grouped_matmul_bwd(cfg: _Config, res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    # w^T tiles: swap block_k and block_n (the wrapper padded K and N to both).
    bs = cfg.block_sizes
    swapped = dataclasses.replace(bs, block_n=bs.block_k, block_k=bs.block_n)
    dx_MK = gmm(
        dy_MN, w_EKN, group_sizes_E, dataclasses.replace(cfg, block_sizes=swapped),
        transpose_rhs=True,
    )  # fmt: skip
    # ragged_dot's own transpose (rows past the groups are masked by clipped sizes).
    ends = jnp.minimum(jnp.cumsum(group_sizes_E), cfg.M)
    sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
    _, vjp = jax.vjp(
        lambda w: reference.grouped_matmul(x_MK, w, sizes, preferred_element_type=jnp.float32),
        w_EKN,
    )
    (dw_EKN,) = vjp(dy_MN.astype(jnp.float32))
    return dx_MK, dw_EKN.astype(w_EKN.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def grouped_matmul(
    x_MK,
    w_EKN,
    group_sizes_E,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """Grouped matmul on Hopper (``dx`` through the kernel too, ``dw`` through XLA).

    Args:
      x_MK: ``[M, K]`` float16 / bfloat16 (float32 in interpret mode only), rows sorted by
        group; rows past ``sum(group_sizes)`` give zeros.
      w_EKN: ``[E, K, N]``, promoted with ``x``'s dtype.
      group_sizes_E: ``[E]`` integer rows per group, ``sum <= M``.
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape``.
      interpret: run in Mosaic GPU interpret mode (CPU).

    Returns:
      ``[M, N]`` in ``x``'s dtype, accumulated in float32.
    """
    (M, K), (E, _, N) = x_MK.shape, w_EKN.shape
    dtype = jnp.result_type(x_MK.dtype, w_EKN.dtype)
    if not interpret and jnp.dtype(dtype) not in attn_gpu.WGMMA_DTYPES:
        raise ValueError(
            f"pallas_gpu grouped_matmul needs float16 or bfloat16 inputs (wgmma), got {dtype}; "
            "cast, or use impl='xla'"
        )
    bs = block_sizes or BlockSizes.for_shape(M, E)
    if not interpret and smem_bytes(bs, dtype) > _SMEM_LIMIT:
        raise ValueError(
            f"{bs} needs {smem_bytes(bs, dtype)} bytes of SMEM, over {_SMEM_LIMIT}; "
            "use fewer stages or smaller blocks"
        )
    unit = math.lcm(bs.block_k, bs.block_n)  # dx swaps the two
    Mp, Kp, Np = (-(-d // u) * u for d, u in ((M, bs.block_m), (K, unit), (N, unit)))
    x = jnp.pad(x_MK.astype(dtype), ((0, Mp - M), (0, Kp - K)))
    w = jnp.pad(w_EKN.astype(dtype), ((0, 0), (0, Kp - K), (0, Np - N)))
    cfg = _Config(M=M, block_sizes=bs, interpret=bool(interpret))
    out = _grouped_matmul(x, w, group_sizes_E.astype(jnp.int32), cfg)
    return out[:M, :N].astype(x_MK.dtype)
