"""Quantized weights and their plain-jnp matmul: the oracle and the ``xla`` path.

Symmetric absmax quantization (no zero points). A ``[K, N]`` weight (``x_MK @ w_KN``) gets one
float32 scale per output column (``group_size=None``), or one per ``group_size`` consecutive
rows of each column, so a scale row covers a group of the contraction dimension:

- ``int8``: ``q = round(w / s)`` in ``[-127, 127]``, ``s = absmax / 127``.
- ``int4``: ``q`` in ``[-7, 7]``, ``s = absmax / 7``; two values per byte along ``K`` (row
  ``2i`` in the low nibble, ``2i + 1`` in the high nibble, two's complement), so ``values`` is
  ``uint8 [ceil(K / 2), N]``.
- ``fp8``: float8 e4m3 (finite, max 448), ``s = absmax / 448``; per channel or per group.

Rounding to nearest keeps ``|w - dequantize(q)| <= s / 2`` for int8 and int4 (half a step);
e4m3 has three mantissa bits, so its error is relative (``<= 2^-4`` of the value, plus a
subnormal floor). Activations for W8A8 are quantized per row with dynamic scales the same way
(``quantize_rows``). Example::

    qw = quantize(w_KN, "int4", group_size=128)
    y_MN = matmul(x_MK, qw)                      # x @ dequantize(qw), float32 accumulation
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCHEMES = ("int8", "int4", "fp8")
ACTIVATIONS = (None, "int8", "fp8")
FP8 = jnp.float8_e4m3fn
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A ``[K, N]`` weight in quantized storage (a pytree: ``values`` and ``scales`` are its
    leaves; the rest is static).

    Attributes:
      values: ``int8 [K, N]`` (int8), ``uint8 [ceil(K / 2), N]`` two nibbles per byte (int4),
        or ``float8_e4m3fn [K, N]`` (fp8).
      scales: float32 ``[G, N]``: ``G = 1`` per channel, else ``K / group_size``.
      scheme: ``"int8"``, ``"int4"`` or ``"fp8"``.
      group_size: rows per scale, ``None`` for one scale per column.
      shape: ``(K, N)`` of the weight.
    """

    values: jax.Array
    scales: jax.Array
    scheme: str = dataclasses.field(metadata=dict(static=True))
    group_size: int | None = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Bytes of storage: values plus scales."""
        return int(self.values.size * self.values.dtype.itemsize + self.scales.size * 4)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {list(SCHEMES)}")


def _group_rows(K: int, group_size: int | None) -> int:
    if group_size is None:
        return K
    if not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of K={K}")
    return group_size


def quantize(w_KN, scheme: str, *, group_size: int | None = None) -> QuantizedWeight:
    """Quantizes a float ``[K, N]`` weight; see the module docstring."""
    check_scheme(scheme)
    if w_KN.ndim != 2 or not jnp.issubdtype(w_KN.dtype, jnp.floating):
        raise ValueError(f"quantize needs a float [K, N] weight, got {w_KN.dtype} {w_KN.shape}")
    K, N = w_KN.shape
    rows = _group_rows(K, group_size)
    w_GRN = w_KN.astype(jnp.float32).reshape(K // rows, rows, N)
    absmax_GN = jnp.max(jnp.abs(w_GRN), axis=1)
    scales_GN = jnp.where(absmax_GN > 0, absmax_GN / _QMAX[scheme], 1.0)
    scaled_KN = (w_GRN / scales_GN[:, None, :]).reshape(K, N)
    if scheme == "fp8":
        values = scaled_KN.astype(FP8)
    else:
        q_KN = jnp.clip(jnp.round(scaled_KN), -_QMAX[scheme], _QMAX[scheme]).astype(jnp.int8)
        values = q_KN if scheme == "int8" else pack_int4(q_KN)
    return QuantizedWeight(values, scales_GN, scheme, group_size, (K, N))


def pack_int4(q_KN):
    """Two int4 values (int8 in ``[-8, 7]``) per byte along ``K``: row ``2i`` in the low nibble.
    An odd ``K`` is padded with a zero row."""
    K = q_KN.shape[0]
    if K % 2:
        q_KN = jnp.pad(q_KN, ((0, 1), (0, 0)))
    nibbles = q_KN.astype(jnp.uint8) & 0xF
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed_HN, K: int):
    """The int8 ``[K, N]`` values of ``pack_int4``'s output (sign-extended nibbles)."""
    low = (packed_HN & 0xF).astype(jnp.int8)
    high = (packed_HN >> 4).astype(jnp.int8)
    q = jnp.stack([low, high], axis=1).reshape(-1, packed_HN.shape[1])[:K]
    return jnp.where(q > 7, q - 16, q)


def int_values(qw: QuantizedWeight):
    """The stored values as ``[K, N]`` (int8 for int8/int4, float8 for fp8)."""
    if qw.scheme == "int4":
        return unpack_int4(qw.values, qw.shape[0])
    return qw.values


def dequantize(qw: QuantizedWeight, dtype=jnp.float32):
    """The ``[K, N]`` weight ``values * scales`` in ``dtype``."""
    check_quantized(qw)
    K, N = qw.shape
    rows = K // qw.scales.shape[0]
    v_GRN = int_values(qw).astype(jnp.float32).reshape(-1, rows, N)
    return (v_GRN * qw.scales[:, None, :]).reshape(K, N).astype(dtype)


def check_quantized(qw) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(
            f"expected a QuantizedWeight (from kernels.quant.quantize), got {type(qw).__name__}"
            + (f" {qw.dtype} {qw.shape}" if hasattr(qw, "dtype") else "")
        )


def pad_to(a, shape, value=0):
    """``a`` padded at the end of each dimension to ``shape`` (a copy only when needed)."""
    pads = [(0, s - d) for s, d in zip(shape, a.shape, strict=True)]
    return jnp.pad(a, pads, constant_values=value) if any(p for _, p in pads) else a


def quantize_rows(x_MK, activations: str):
    """Per-row dynamic quantization of activations: ``(values [M, K], scales float32 [M, 1])``
    with int8 values in ``[-127, 127]`` or float8 e4m3."""
    x = x_MK.astype(jnp.float32)
    absmax_M1 = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    scales_M1 = jnp.where(absmax_M1 > 0, absmax_M1 / _QMAX[activations], 1.0)
    if activations == "fp8":
        return (x / scales_M1).astype(FP8), scales_M1
    return jnp.clip(jnp.round(x / scales_M1), -127, 127).astype(jnp.int8), scales_M1


def check_matmul(x_MK, qw: QuantizedWeight, activations) -> None:
    """Raises ``ValueError`` naming the problem for inputs no matmul path accepts."""
    check_quantized(qw)
    if x_MK.ndim != 2 or x_MK.shape[1] != qw.shape[0]:
        raise ValueError(f"x must be [M, K] with K={qw.shape[0]}, got shape {x_MK.shape}")
    if not jnp.issubdtype(x_MK.dtype, jnp.floating):
        raise ValueError(f"x must be a float array, got {x_MK.dtype}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; valid: {list(ACTIVATIONS)}")
    if activations is not None and (qw.scheme != activations or qw.group_size is not None):
        raise ValueError(
            f"activations={activations!r} needs a per-channel {activations} weight "
            f"(group_size=None), got scheme={qw.scheme!r} group_size={qw.group_size}"
        )


def matmul(x_MK, qw: QuantizedWeight, *, activations: str | None = None, precise: bool = True):
    """``x @ dequantize(qw)`` in float32, returned in the dtype of ``x``.

    Weight-only (``activations=None``): the weight is dequantized (to float32 with
    ``precise``, the reference; else to the dtype of ``x``, the ``xla`` path) and multiplied
    with float32 accumulation. W8A8 (``"int8"`` / ``"fp8"``): ``x`` is quantized per row, the
    product runs on the quantized values (int32 / float32 accumulation) and both scales are
    applied to the result.
    """
    check_matmul(x_MK, qw, activations)
    if activations is None:
        w = dequantize(qw, jnp.float32 if precise else x_MK.dtype)
        x = x_MK.astype(jnp.float32) if precise else x_MK
        out = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return out.astype(x_MK.dtype)
    xq_MK, xs_M1 = quantize_rows(x_MK, activations)
    acc = jnp.int32 if activations == "int8" else jnp.float32
    out = jnp.dot(xq_MK, qw.values, preferred_element_type=acc).astype(jnp.float32)
    return (out * xs_M1 * qw.scales).astype(x_MK.dtype)
