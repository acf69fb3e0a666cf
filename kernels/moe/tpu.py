"""Grouped matmul (dropless MoE) as Pallas Mosaic TPU kernels, forward and backward.

``out[m] = x[m] @ w[group(m)]`` with the rows of ``x`` sorted by group (MegaBlocks, Gale et al.,
arXiv:2211.15841). Rows are tiled in blocks of ``tm``; a row tile that straddles group
boundaries is *visited* once per group it touches, and each visit keeps only its group's rows.
The visit list is computed from ``group_sizes`` in the wrapper and scalar-prefetched
(``visits``): for visit ``v``, the output row tile and group it serves, the row range of that
group inside the tile, and first/last/compute flags. Its static length is
``num_row_tiles + E - 1``, the most a partition of the rows into ``E`` runs can need; unused
trailing visits repeat the last block indices (no DMA, no write) and do nothing.

Three kernels share this metadata:

- ``gmm`` (forward, and ``dx = dy @ w[g]^T`` with the weight read transposed in place): grid
  ``(N / tn, visits, K / tk)``. Visits of one row tile are consecutive, so its output block
  stays resident in VMEM while a float32 accumulator collects every group's masked product;
  it is zeroed on the tile's first visit and written on its last. Row tiles past
  ``sum(group_sizes)`` get one visit that writes zeros.
- ``tgmm`` (``dw[e] = x_e^T dy_e``): grid ``(K / tk, N / tn, visits)`` with visits ordered by
  group, so ``dw[e]``'s block is resident over the group's row tiles. An empty group gets one
  visit that writes zeros, so its gradient is exactly zero.

Masking is by row: ``gmm`` selects rows of the float32 product (a row of the output depends
only on its row of ``x``), ``tgmm`` selects rows of the ``x`` tile before the contraction. Both
select rather than multiply, so non-finite values in rows outside the group do not leak.

Shapes need not divide the blocks: ``M``, ``K`` and ``N`` are zero-padded in the wrapper and the
output sliced. On CPU pass ``interpret=True`` (TPU interpret mode)::

    out_MN = grouped_matmul(x_MK, w_EKN, group_sizes_E, interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_SUBLANES, _LANES = 8, 128
_FIRST, _LAST, _COMPUTE = 1, 2, 4  # visit flags


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the grouped matmul: ``tm`` rows of ``x``, ``tk`` of the contraction, ``tn``
    output columns. ``M``, ``K`` and ``N`` are padded up to them.

    ``tm`` is a second-minor (sublane) dim, a multiple of 8; ``tk`` and ``tn`` are lane dims,
    multiples of 128. The backward uses the same tiles (``dx`` contracts over ``tn`` columns
    and writes ``tk``-wide tiles).
    """

    tm: int = 128
    tk: int = 512
    tn: int = 512

    def __post_init__(self):
        for name, unit in (("tm", _SUBLANES), ("tk", _LANES), ("tn", _LANES)):
            b = getattr(self, name)
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % unit:
                raise ValueError(f"{name} must be a positive multiple of {unit}, got {b!r}")

    @classmethod
    def for_shape(cls, M: int, K: int, N: int, E: int, dtype) -> BlockSizes:
        """Default tiles. ``tm`` trades two costs: each visit streams a whole ``[K, N]`` weight
        for ``tm`` rows (more weight bytes per flop when small), and each of up to ``E - 1``
        group boundaries inside a tile adds a visit of ``tm`` rows (wasted MXU work when
        large). ``tm`` in ``{128, 256, 512}`` minimises ``max(flops / 240, weight bytes)``
        over ``ceil(M / tm) + E - 1`` visits (240: bf16 flops per HBM byte of a v5e), ties
        to the larger, capped by ``M`` in whole native tiles (16 rows for 16-bit dtypes).
        ``tk = 512``, ``tn = 1024`` (16-bit) or 512, capped by the padded shape: about 7 MiB
        of VMEM with double buffering at the largest. Unmeasured.
        """
        itemsize = jnp.dtype(dtype).itemsize
        cap = _round_up(M, _SUBLANES * max(1, 4 // itemsize))

        def cost(tm):  # per K * N
            visits = -(-M // tm) + E - 1
            return max(2 * visits * tm / 240, visits * itemsize)

        tm = min((512, 256, 128), key=cost)
        tm = min(tm, cap)
        tk = min(512, _round_up(K, _LANES))
        tn = min(1024 if itemsize <= 2 else 512, _round_up(N, _LANES))
        return cls(tm=tm, tk=tk, tn=tn)


class Visits(NamedTuple):
    """Scalar-prefetched metadata, one int32 entry per visit (``[V]`` each).

    ``tile``/``group``: the output row tile (``gmm``) / the group (``tgmm``) the visit serves.
    ``data_tile``/``data_group``: the blocks it reads; a visit that computes nothing reads the
    blocks of the last visit that did, so it triggers no DMA. ``lo``/``hi``: the group's rows
    within the tile, ``[lo, hi)`` relative to the tile's first row. ``flags``: ``_FIRST`` (zero
    the accumulator), ``_LAST`` (write the output), ``_COMPUTE`` (the range is non-empty).
    """

    tile: jax.Array
    group: jax.Array
    data_tile: jax.Array
    data_group: jax.Array
    lo: jax.Array
    hi: jax.Array
    flags: jax.Array


def make_visits(group_sizes_E, *, M: int, tm: int, num_tiles: int, by_group: bool) -> Visits:
    """The visit list of ``gmm`` (``by_group=False``) or ``tgmm`` (``by_group=True``).

    Visits are the (group, row tile) pairs with at least one row of the group in the tile,
    ordered by group and tile (so by tile too: groups are contiguous runs of rows). ``gmm``
    appends one visit per row tile past ``sum(group_sizes)`` (its output is zeros); ``tgmm``
    gives each empty group one visit instead (its gradient is zeros). Sizes are clipped so the
    groups end by row ``M``.
    """
    E = group_sizes_E.shape[0]
    V = num_tiles + E - 1
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_E.astype(jnp.int32), 0)), M)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    nonempty = ends > starts
    first = jnp.minimum(starts // tm, num_tiles - 1)
    count = jnp.where(nonempty, (ends - 1) // tm - first + 1, 1 if by_group else 0)
    cum = jnp.cumsum(count)
    v = jnp.arange(V, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cum, v, side="right"), E - 1).astype(jnp.int32)
    tile = first[group] + v - (cum[group] - count[group])
    in_group = v < cum[-1]
    n_active = cum[-1]
    if not by_group:
        covered = -(-ends[-1] // tm)  # row tiles holding a grouped row
        tile = jnp.where(in_group, tile, covered + v - cum[-1])
        n_active = cum[-1] + num_tiles - covered
    active = v < n_active
    lo = jnp.where(in_group, jnp.clip(starts[group] - tile * tm, 0, tm), 0)
    hi = jnp.where(in_group, jnp.clip(ends[group] - tile * tm, 0, tm), 0)
    compute = in_group & (hi > lo)
    # Padding visits keep the last active visit's blocks: nothing is fetched or written back.
    last_active = jnp.maximum(n_active - 1, 0)
    tile = jnp.where(active, tile, tile[last_active])
    group = jnp.where(active, group, group[last_active])
    key = group if by_group else tile
    prev_key = jnp.concatenate([jnp.full((1,), -1, jnp.int32), key[:-1]])
    next_key = jnp.concatenate([key[1:], jnp.full((1,), -1, jnp.int32)])
    is_first = active & (key != prev_key)
    is_last = active & ((key != next_key) | (v == n_active - 1))
    flags = (
        jnp.where(is_first, _FIRST, 0)
        + jnp.where(is_last, _LAST, 0)
        + jnp.where(compute, _COMPUTE, 0)
    )
    source = jnp.maximum(jax.lax.cummax(jnp.where(compute, v, -1)), 0)
    return Visits(
        tile=tile.astype(jnp.int32),
        group=group,
        data_tile=tile[source].astype(jnp.int32),
        data_group=group[source],
        lo=lo.astype(jnp.int32),
        hi=hi.astype(jnp.int32),
        flags=flags.astype(jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call (hashable: ``custom_vjp`` non-diff argument)."""

    M: int  # rows before padding; groups end by row M
    block_sizes: BlockSizes
    interpret: bool


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gmm_kernel(*refs, transpose_rhs: bool):
    meta, (x_ref, w_ref, o_ref, acc_ref) = Visits(*refs[:7]), refs[7:]
    v, k = pl.program_id(1), pl.program_id(2)
    flags = meta.flags[v]
    tm, tn = acc_ref.shape

    @pl.when((k == 0) & (flags & _FIRST != 0))
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(flags & _COMPUTE != 0)
    def _accumulate():
        lo, hi = meta.lo[v], meta.hi[v]
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        p = jax.lax.dot_general(
            x_ref[...],
            w_ref[...],
            dims,
            precision=_precision(x_ref.dtype),
            preferred_element_type=jnp.float32,
        )
        full = (lo == 0) & (hi == tm)

        @pl.when(full)
        def _whole_tile():
            acc_ref[...] += p

        @pl.when(jnp.logical_not(full))
        def _rows_of_group():
            rows = jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            acc_ref[...] += jnp.where((rows >= lo) & (rows < hi), p, 0.0)

    @pl.when((k == pl.num_programs(2) - 1) & (flags & _LAST != 0))
    def _write():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def gmm(x_MK, w_E, group_sizes_E, cfg: _Config, *, transpose_rhs: bool = False):
    """Padded grouped matmul: ``[Mp, Np]`` from ``x [Mp, Kp]`` and ``w [E, Kp, Np]`` (or
    ``w [E, Np, Kp]`` read transposed when ``transpose_rhs``), in ``x``'s dtype."""
    bs = cfg.block_sizes
    Mp, Kp = x_MK.shape
    if transpose_rhs:  # dx = dy @ w^T: contraction over w's N, output columns over its K
        tk, tn, Np = bs.tn, bs.tk, w_E.shape[1]
    else:
        tk, tn, Np = bs.tk, bs.tn, w_E.shape[2]
    tm, nk = bs.tm, Kp // tk
    meta = make_visits(group_sizes_E, M=cfg.M, tm=tm, num_tiles=Mp // tm, by_group=False)

    def k_of(v, k, m):
        return jnp.where(m.flags[v] & _COMPUTE != 0, k, nk - 1)

    def x_map(j, v, k, *m):
        m = Visits(*m)
        return m.data_tile[v], k_of(v, k, m)

    def w_map(j, v, k, *m):
        m = Visits(*m)
        kk = k_of(v, k, m)
        return (m.data_group[v], j, kk) if transpose_rhs else (m.data_group[v], kk, j)

    w_block = (pl.Squeezed(), tn, tk) if transpose_rhs else (pl.Squeezed(), tk, tn)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(Np // tn, meta.tile.shape[0], nk),
            in_specs=[pl.BlockSpec((tm, tk), x_map), pl.BlockSpec(w_block, w_map)],
            out_specs=pl.BlockSpec((tm, tn), lambda j, v, k, *m: (Visits(*m).tile[v], j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x_MK.dtype),
        # Visits of one row tile share its output block, so only N may be split across cores.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        name="grouped_matmul_t" if transpose_rhs else "grouped_matmul",
    )(*meta, x_MK, w_E)


def _tgmm_kernel(*refs):
    meta, (x_ref, dy_ref, o_ref, acc_ref) = Visits(*refs[:7]), refs[7:]
    v = pl.program_id(2)
    flags = meta.flags[v]
    tm, tk = x_ref.shape

    @pl.when(flags & _FIRST != 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(flags & _COMPUTE != 0)
    def _accumulate():
        rows = jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
        x = x_ref[...]
        x = jnp.where((rows >= meta.lo[v]) & (rows < meta.hi[v]), x, jnp.zeros_like(x))
        acc_ref[...] += jax.lax.dot_general(
            x,
            dy_ref[...],
            (((0,), (0,)), ((), ())),
            precision=_precision(x.dtype),
            preferred_element_type=jnp.float32,
        )

    @pl.when(flags & _LAST != 0)
    def _write():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(x_MK, dy_MN, group_sizes_E, cfg: _Config, out_dtype):
    """Transposed grouped matmul ``dw[e] = x_e^T dy_e``: ``[E, Kp, Np]`` from padded
    ``x [Mp, Kp]`` and ``dy [Mp, Np]``; zero for empty groups."""
    bs = cfg.block_sizes
    (Mp, Kp), Np, E = x_MK.shape, dy_MN.shape[1], group_sizes_E.shape[0]
    tm, tk, tn = bs.tm, bs.tk, bs.tn
    meta = make_visits(group_sizes_E, M=cfg.M, tm=tm, num_tiles=Mp // tm, by_group=True)
    return pl.pallas_call(
        _tgmm_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(meta),
            grid=(Kp // tk, Np // tn, meta.tile.shape[0]),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda i, j, v, *m: (Visits(*m).data_tile[v], i)),
                pl.BlockSpec((tm, tn), lambda i, j, v, *m: (Visits(*m).data_tile[v], j)),
            ],
            out_specs=pl.BlockSpec(
                (pl.Squeezed(), tk, tn), lambda i, j, v, *m: (Visits(*m).group[v], i, j)
            ),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((E, Kp, Np), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if cfg.interpret else False,
        name="grouped_matmul_tgmm",
    )(*meta, x_MK, dy_MN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x_MK, w_EKN, group_sizes_E, cfg: _Config):
    return gmm(x_MK, w_EKN, group_sizes_E, cfg)


def _grouped_matmul_fwd(x_MK, w_EKN, group_sizes_E, cfg: _Config):
    return gmm(x_MK, w_EKN, group_sizes_E, cfg), (x_MK, w_EKN, group_sizes_E)


def _grouped_matmul_bwd(cfg: _Config, res, dy_MN):
    x_MK, w_EKN, group_sizes_E = res
    dx_MK = gmm(dy_MN.astype(x_MK.dtype), w_EKN, group_sizes_E, cfg, transpose_rhs=True)
    dw_EKN = tgmm(x_MK, dy_MN.astype(x_MK.dtype), group_sizes_E, cfg, w_EKN.dtype)
    return dx_MK, dw_EKN, None


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
    """Grouped matmul on TPU with a Pallas backward (``dx`` and ``dw``; none for the sizes).

    Args:
      x_MK: ``[M, K]`` rows sorted by group; rows past ``sum(group_sizes)`` give zeros.
      w_EKN: ``[E, K, N]``; a dtype differing from ``x``'s is promoted with it for the matmul.
      group_sizes_E: ``[E]`` integer rows per group (zeros allowed), ``sum <= M``.
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape``.
      interpret: run in TPU interpret mode (CPU).

    Returns:
      ``[M, N]`` in ``x``'s dtype, accumulated in float32.
    """
    (M, K), (E, _, N) = x_MK.shape, w_EKN.shape
    dtype = jnp.result_type(x_MK.dtype, w_EKN.dtype)
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(M, K, N, E, dtype)
    bs = block_sizes
    Mp, Kp, Np = _round_up(M, bs.tm), _round_up(K, bs.tk), _round_up(N, bs.tn)
    x = jnp.pad(x_MK.astype(dtype), ((0, Mp - M), (0, Kp - K)))
    w = jnp.pad(w_EKN.astype(dtype), ((0, 0), (0, Kp - K), (0, Np - N)))
    cfg = _Config(M=M, block_sizes=bs, interpret=interpret)
    out = _grouped_matmul(x, w, group_sizes_E.astype(jnp.int32), cfg)
    return out[:M, :N].astype(x_MK.dtype)
