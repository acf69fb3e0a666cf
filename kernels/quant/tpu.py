"""Quantized matmul ``x_MK @ dequantize(qw)`` as a Pallas Mosaic TPU kernel.

The weight tile reaches VMEM in its stored form (int8, int4 packed two per byte, float8 e4m3),
so HBM traffic is the quantized bytes, and is dequantized there: converted to the compute
dtype (bfloat16 for bfloat16 ``x``, else float32; int4 and int8 values and e4m3 are exact in
both) and fed to the MXU as is, with the scales applied to float32 products, never to the
weights. Per-channel scales multiply the accumulated ``[bm, bn]`` result once, in the last K
step; grouped scales multiply each group's partial product (one dot per group of the tile).

Grid ``(M / bm, N / bn, K / bk)`` with K innermost (the reduction, ``"arbitrary"``) and a VMEM
accumulator: float32, or int32 for W8A8 int8 (int8 x int8 dots, exact across K steps).

int4: the wrapper reorders the columns of ``x`` within each chunk (a group, or a K tile when
per channel) to ``[even columns | odd columns]``; in the kernel the packed tile is
sign-extended to int32, its low and high nibbles become two ``[chunk / 2, bn]`` halves, and
``[low; high]`` (a sublane-aligned concatenation) meets the reordered ``x`` chunk in one dot.
float8: tiles are upcast to the compute dtype (bfloat16 for W8A8 fp8, exact: e4m3 products fit
the float32 accumulator), since only some TPU generations have fp8 MXU inputs.

Shapes need not divide the blocks: ``M``, ``N`` and ``K`` are zero-padded in the wrapper (the
packed int4 rows and the scale rows too; zero weights add nothing) and the output is sliced.
Semantics are those of ``reference.matmul``; on CPU pass ``interpret=True``::

    y_MN = matmul(x_MK, quantize(w_KN, "int4", group_size=128), interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.quant import reference

_SUBLANES, _LANES = 8, 128
# Weight tile elements of the defaults: 2**19 keeps the dequantized tile (and the int32
# nibbles of an int4 tile) at 2 MiB or less in VMEM.
_TILE_ELEMENTS = 2**19


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of ``x_MK @ w_KN``; ``M``, ``N`` and ``K`` are padded up to them.

    ``block_m`` is the second-minor dim of the ``x`` and output tiles (a multiple of 8
    sublanes); ``block_n`` and ``block_k`` are lane dims (multiples of 128). ``block_k``
    counts unpacked rows of the weight, so an int4 tile holds ``block_k / 2`` packed rows (a
    multiple of 64, whole int8 ``(32, 128)`` tiles); with grouped scales it must be a
    multiple of ``group_size`` (``check``).
    """

    block_m: int = 128
    block_n: int = 512
    block_k: int = 1024

    def __post_init__(self):
        for name, unit in (("block_m", _SUBLANES), ("block_n", _LANES), ("block_k", _LANES)):
            b = getattr(self, name)
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % unit:
                raise ValueError(f"{name} must be a positive multiple of {unit}, got {b!r}")

    def check(self, group_size: int | None) -> None:
        """Raises ``ValueError`` unless ``block_k`` is a multiple of ``group_size``."""
        if group_size is not None and self.block_k % group_size:
            raise ValueError(
                f"block_k={self.block_k} must be a multiple of group_size={group_size}"
            )

    @classmethod
    def for_shape(cls, M: int, K: int, N: int, *, group_size: int | None = None) -> BlockSizes:
        """Default tiles: a ``[1024, 512]`` weight tile (``2**19`` elements) capped by the
        padded shape, ``block_k`` rounded to whole groups. ``block_m`` is all of ``M`` (padded
        to 8) up to 256, else 256: a block spanning the whole padded array is legal for any
        dtype, and 256 is whole native tiles of 8-, 16- and 32-bit ``x`` alike. Decode (small
        ``M``) streams the weight; the tiles amortise the per-step overhead.
        """
        block_m = min(256, _round_up(M, _SUBLANES))
        block_n = min(_TILE_ELEMENTS // 1024, _round_up(N, _LANES))
        block_k = min(1024, _round_up(K, _LANES))
        if group_size is not None:
            block_k = _round_up(block_k, group_size)
        return cls(block_m=block_m, block_n=block_n, block_k=block_k)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static attributes of one call."""

    scheme: str
    activations: str | None
    grouped: bool
    chunk: int  # K rows per dot: the group size, or block_k when per channel
    compute_dtype: jnp.dtype  # MXU input dtype (int8 for W8A8 int8)
    acc_dtype: jnp.dtype


def _to_float(v, dtype):
    # Through 32-bit intermediates: the int / fp8 -> float conversions every TPU lowers.
    if jnp.issubdtype(v.dtype, jnp.integer):
        v = v.astype(jnp.int32)
    return v.astype(jnp.float32).astype(dtype)


def _weight_chunks(w_ref, cfg: _Config):
    """The weight tile as ``[chunk, bn]`` pieces in the compute dtype."""
    w = w_ref[...]
    n = (2 * w.shape[0] if cfg.scheme == "int4" else w.shape[0]) // cfg.chunk
    if cfg.scheme == "int4":
        b = w.astype(jnp.int32)  # the packed byte, sign-extended from int8
        low = _to_float((b << 28) >> 28, cfg.compute_dtype)  # rows 2i
        high = _to_float(b >> 4, cfg.compute_dtype)  # rows 2i + 1
        h = cfg.chunk // 2
        return [
            jnp.concatenate([low[c * h : (c + 1) * h], high[c * h : (c + 1) * h]], axis=0)
            for c in range(n)
        ]
    if w.dtype != cfg.compute_dtype:
        w = _to_float(w, cfg.compute_dtype)
    return [w[c * cfg.chunk : (c + 1) * cfg.chunk] for c in range(n)]


def _kernel(*refs, cfg: _Config):
    if cfg.activations is None:
        x_ref, w_ref, ws_ref, o_ref, acc_ref = refs
        xs_ref = None
    else:
        x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    f32 = cfg.compute_dtype == jnp.float32
    precision = jax.lax.Precision.HIGHEST if f32 else None
    acc = None
    for c, w_c in enumerate(_weight_chunks(w_ref, cfg)):
        x_c = x_ref[:, c * cfg.chunk : (c + 1) * cfg.chunk]
        if x_c.dtype != cfg.compute_dtype:
            x_c = _to_float(x_c, cfg.compute_dtype)
        p = jnp.dot(x_c, w_c, preferred_element_type=cfg.acc_dtype, precision=precision)
        if cfg.grouped:
            p = p * ws_ref[c]  # [bm, bn] * [1, bn]: group c of this K tile
        acc = p if acc is None else acc + p
    acc_ref[...] += acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish():
        out = acc_ref[...].astype(jnp.float32)
        if not cfg.grouped:
            out = out * ws_ref[...]
        if xs_ref is not None:
            out = out * xs_ref[...]
        o_ref[...] = out.astype(o_ref.dtype)


def _even_odd(x_MK, chunk: int):
    """Reorders the columns of each ``chunk`` to ``[even | odd]`` (the int4 nibble halves)."""
    M, K = x_MK.shape
    return x_MK.reshape(M, K // chunk, chunk // 2, 2).swapaxes(2, 3).reshape(M, K)


@functools.partial(jax.jit, static_argnames=("activations", "block_sizes", "interpret"))
def matmul(
    x_MK,
    qw: reference.QuantizedWeight,
    *,
    activations: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
):
    """``x @ dequantize(qw)`` on TPU, up to accumulation error.

    Args:
      x_MK: float activations ``[M, K]``.
      qw: a ``QuantizedWeight`` of shape ``(K, N)``; grouped scales need ``group_size`` a
        multiple of 128 (each group's ``x`` slice is whole lane tiles).
      activations: ``None`` (weight-only), ``"int8"`` or ``"fp8"`` (W8A8: ``x`` quantized per
        row with ``reference.quantize_rows``; needs a per-channel weight of that scheme).
      block_sizes: ``BlockSizes``; default ``BlockSizes.for_shape``.
      interpret: run in TPU interpret mode (CPU).

    Returns:
      ``[M, N]`` in the dtype of ``x``.
    """
    reference.check_matmul(x_MK, qw, activations)
    M, K = x_MK.shape
    N = qw.shape[1]
    gs = qw.group_size
    if gs is not None and gs % _LANES:
        raise ValueError(
            f"impl='pallas_tpu' needs group_size a multiple of {_LANES}, got {gs}; "
            "use impl='xla' for smaller groups"
        )
    int4 = qw.scheme == "int4"
    K_rows = 2 * qw.values.shape[0] if int4 else K  # unpacked rows, odd int4 K padded by one
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(M, K_rows, N, group_size=gs)
    block_sizes.check(gs)
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    Mp, Np, Kp = _round_up(M, bm), _round_up(N, bn), _round_up(K_rows, bk)

    if activations is None:
        compute = jnp.bfloat16 if x_MK.dtype == jnp.bfloat16 else jnp.float32
        x, xs = x_MK.astype(compute), None
        acc_dtype = jnp.float32
    else:
        x, xs = reference.quantize_rows(x_MK, activations)
        compute = jnp.int8 if activations == "int8" else jnp.bfloat16
        acc_dtype = jnp.int32 if activations == "int8" else jnp.float32
    cfg = _Config(
        scheme=qw.scheme,
        activations=activations,
        grouped=gs is not None,
        chunk=bk if gs is None else gs,
        compute_dtype=jnp.dtype(compute),
        acc_dtype=jnp.dtype(acc_dtype),
    )
    x = reference.pad_to(x, (Mp, Kp))
    values = qw.values
    if int4:
        x = _even_odd(x, cfg.chunk)
        # Same bytes; the kernel sign-extends them (int8 -> int32 is the widening TPUs lower).
        values = jax.lax.bitcast_convert_type(values, jnp.int8)
    w_rows = Kp // 2 if int4 else Kp
    values = reference.pad_to(values, (w_rows, Np))

    x_spec = pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))
    w_spec = pl.BlockSpec((bk // 2 if int4 else bk, bn), lambda i, j, k: (k, j))
    if gs is None:
        scales = reference.pad_to(qw.scales, (1, Np))
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    else:
        # [G, 1, N]: a tile's bk / gs scale rows as a leading dim, each a full (1, bn) tile.
        scales = reference.pad_to(qw.scales, (Kp // gs, Np))[:, None, :]
        s_spec = pl.BlockSpec((bk // gs, 1, bn), lambda i, j, k: (k, 0, j))
    operands, in_specs = [x], [x_spec]
    if xs is not None:
        operands.append(reference.pad_to(xs, (Mp, 1)))
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)))
    operands += [values, scales]
    in_specs += [w_spec, s_spec]
    out_dtype = jnp.bfloat16 if x_MK.dtype == jnp.bfloat16 else jnp.float32

    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(Mp // bm, Np // bn, Kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"quant_matmul_{qw.scheme}" + (f"_a{activations}" if activations else ""),
    )(*operands)
    return out[:M, :N].astype(x_MK.dtype)
