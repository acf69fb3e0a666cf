"""Attention ops: full-sequence (prefill/training), decode over a KV cache, and cached chunks.

Layouts (STYLE.md letters): queries ``q_BTNH``, keys and values ``k_BSKH`` / ``v_BSKH`` with
``N % K == 0`` (MHA ``K == N``, GQA, MQA ``K == 1``, as in Pope et al. 2022 §3.3). Softmax
statistics are float32 in every implementation.

Implementations (``impl``):
  ``reference``  plain jnp in float32: the oracle.
  ``xla``        the same math with matmul inputs in their own dtype, float32 accumulation.
  ``cudnn``      cuDNN fused flash attention through ``jax.nn.dot_product_attention``
                 (CUDA GPUs; ``attention`` only). It supports what cuDNN supports: bfloat16 or
                 float16, causal only with ``T == S`` (cuDNN's causal mask is aligned top-left),
                 sliding windows only when causal, ``lengths``; no ``softcap``.
  ``pallas_tpu`` the Pallas Mosaic TPU kernels (``tpu.py``, ``tpu_bwd.py``, ``tpu_decode.py``),
                 on a TPU or with ``interpret=True``.
  ``pallas_gpu`` the Pallas Mosaic GPU kernels (Hopper, ``gpu.py``, ``gpu_bwd.py``,
                 ``gpu_decode.py``), on a GPU or with ``interpret=True``; bfloat16/float16 on
                 the GPU, ``H`` a multiple of 64 up to 256; ``cached_attention`` is
                 inference-only.
  ``auto``       the best path available on the running backend: ``pallas_tpu`` on a TPU;
                 ``pallas_gpu`` on a Hopper GPU for bfloat16/float16 with ``H`` a multiple of 64
                 up to 256; ``xla`` otherwise (``cached_attention`` has no TPU kernel yet).

int8 KV caches: ``decode_attention`` and ``cached_attention`` also take an int8 cache with one
float scale per token and kv head (``k_scale_BSK``, ``v_scale_BSK``; the cache holds
``k_BSKH * k_scale_BSK[..., None]``). ``reference`` and ``xla`` dequantize it (to float32 /
the dtype of ``q``) and run the math above; ``pallas_tpu`` reads int8 tiles and dequantizes in
VMEM (``tpu_decode.decode_attention_int8``; decode only); ``pallas_gpu`` has no int8 kernel yet,
so ``auto`` picks ``xla`` there.

Unsupported (impl, option) pairs raise ``ValueError`` naming the option; no path silently falls
back to another.

Example::

    out_BTNH = kernels.attention.attention(q, k, v, causal=True, sliding_window=4096)
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.attention import reference

IMPLS = ("auto", "reference", "xla", "cudnn", "pallas_tpu", "pallas_gpu")
_JNP_IMPLS = ("reference", "xla")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _resolve_impl(impl: str, q, *, tpu: bool = True, gpu: bool = True) -> str:
    """``impl``, with ``auto`` resolved for query ``q`` on the running backend: the Pallas TPU
    kernels on a TPU (where the op has one: ``tpu``); on a Hopper GPU (compute capability 9.x,
    for wgmma) the Pallas Mosaic GPU kernels (where the op has one: ``gpu``) for
    float16/bfloat16 with ``H`` a multiple of 64 up to 256; else ``xla``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid: {list(IMPLS)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu" and tpu:
        return "pallas_tpu"
    if gpu and backend == "gpu" and _is_hopper() and q.dtype in (jnp.bfloat16, jnp.float16):
        H = q.shape[-1]
        if H % 64 == 0 and H <= 256:
            return "pallas_gpu"
    return "xla"


def _is_hopper() -> bool:
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return capability.startswith("9.")


def _require_jnp(impl: str, op: str, others: tuple[str, ...] = ()) -> None:
    if impl not in _JNP_IMPLS:
        supported = ["auto", *_JNP_IMPLS, *others]
        raise ValueError(f"{op} does not support impl={impl!r}; supported: {supported}")


_PALLAS_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def _pallas_module(impl: str, name: str, interpret: bool):
    """The Pallas module ``kernels.attention.<name>`` of ``impl``, checked to be runnable here
    (its backend, or any backend in interpret mode). Imported on use: Pallas backends load
    only when asked for."""
    backend, want = jax.default_backend(), _PALLAS_BACKEND[impl]
    if backend != want and not interpret:
        raise ValueError(
            f"impl={impl!r} needs a {want.upper()} backend (running on {backend!r}); "
            "pass interpret=True to run it on CPU, or use impl='xla'"
        )
    return importlib.import_module(f"kernels.attention.{name}")


def _cudnn_attention(q, k, v, *, causal, sliding_window, lengths, softcap, scale):
    """``jax.nn.dot_product_attention(implementation="cudnn")`` restricted to Kestrel semantics.

    Kestrel's queries are the last ``T`` of ``S`` positions; cuDNN aligns its causal mask
    top-left (query ``t`` sees keys ``<= t``), so the two agree only when ``T == S``.
    Kestrel's window ``w`` (keys in ``(p - w, p]``) is JAX's ``local_window_size=(w - 1, 0)``.
    """
    if softcap is not None:
        raise ValueError("impl='cudnn' does not support softcap; use impl='xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    T, S = q.shape[1], k.shape[1]
    if causal and T != S:
        raise ValueError(
            f"impl='cudnn' supports causal attention only with T == S (cuDNN's causal mask is "
            f"aligned top-left), got T={T}, S={S}"
        )
    if sliding_window is not None and not causal:
        raise ValueError("impl='cudnn' supports sliding_window only with causal=True")
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(
            f"impl='cudnn' needs a CUDA GPU backend with cuDNN (running on {backend!r}); "
            "use impl='xla'"
        )
    kwargs = {}
    if sliding_window is not None:
        kwargs["local_window_size"] = (sliding_window - 1, 0)
    if lengths is not None:
        kwargs["key_value_seq_lengths"] = lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation="cudnn", **kwargs
    )


def _check_qkv(q, k, v, q_name: str, q_rank: int, *, quantized: bool = False) -> None:
    """Shapes and dtypes of q/k/v: all one float dtype, or (``quantized``) float ``q`` with
    int8 ``k`` and ``v``."""
    if q.ndim != q_rank:
        raise ValueError(f"{q_name} must have rank {q_rank}, got shape {q.shape}")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [B, S, K, H] with equal shapes, got {k.shape} and {v.shape}"
        )
    B, N, H = q.shape[0], q.shape[-2], q.shape[-1]
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(
            f"batch/head_dim mismatch: {q_name} {q.shape} vs k {k.shape} (need B and H equal)"
        )
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads N={N} not divisible by kv heads K={K}")
    if quantized:  # k and v int8: checked with their scales by _check_scales
        if q.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{q_name} must be a float array, got {q.dtype}")
        return
    for name, a in ((q_name, q), ("k", k), ("v", v)):
        if a.dtype == jnp.int8 and name != q_name:
            raise ValueError(
                f"{name} is an int8 cache: pass its scales as k_scale_BSK and v_scale_BSK"
            )
        if a.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float array, got {a.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"{q_name}, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}; "
            "cast them first"
        )


def _check_scales(k, v, k_scale, v_scale) -> bool:
    """Whether the cache is int8 with scales; raises on a half-given pair, on scales of a float
    cache, and on scales whose shape is not ``k.shape[:3]``."""
    if k_scale is None and v_scale is None:
        return False
    if k_scale is None or v_scale is None:
        raise ValueError("an int8 cache needs both k_scale_BSK and v_scale_BSK, got only one")
    if k.dtype != jnp.int8 or v.dtype != jnp.int8:
        raise ValueError(
            f"k_scale_BSK/v_scale_BSK are for an int8 cache, but k and v are {k.dtype} and "
            f"{v.dtype}; drop the scales or pass int8 k and v"
        )
    want = k.shape[:3]
    if k_scale.shape != want or v_scale.shape != want:
        raise ValueError(
            f"k_scale_BSK and v_scale_BSK must be [B, S, K] = {want}, got {k_scale.shape} and "
            f"{v_scale.shape}"
        )
    for name, a in (("k_scale_BSK", k_scale), ("v_scale_BSK", v_scale)):
        if a.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float array, got {a.dtype}")
    return True


def _no_int8_gpu(impl: str, op: str) -> None:
    if impl == "pallas_gpu":
        raise ValueError(
            f"{op}: impl='pallas_gpu' has no int8 KV-cache kernel yet; use impl='xla' "
            "(or 'auto', which picks it on GPUs for int8 caches)"
        )


def _dequantized(k, v, k_scale, v_scale, dtype):
    """Float ``k``/``v`` of an int8 cache: ``k * k_scale`` in float32, cast to ``dtype``."""
    k = k.astype(jnp.float32) * k_scale.astype(jnp.float32)[..., None]
    v = v.astype(jnp.float32) * v_scale.astype(jnp.float32)[..., None]
    return k.astype(dtype), v.astype(dtype)


def _check_lengths(lengths, B: int, name: str) -> None:
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape ({B},), got {lengths.shape}")


def _check_options(sliding_window, softcap) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


_STATIC = ("causal", "sliding_window", "softcap", "scale", "impl", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    lengths=None,
    softcap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
):
    """Multi-head attention where the queries are the last ``T`` of ``S`` positions.

    Args:
      q_BTNH: queries; query ``t`` sits at position ``S - T + t``.
      k_BSKH, v_BSKH: keys and values at positions ``0..S-1``.
      causal: a query sees only keys at positions ``<=`` its own.
      sliding_window: ``w`` restricts a query at ``p`` to keys at positions ``> p - w``.
      lengths: optional ``[B]`` int; keys at positions ``>= lengths[b]`` are masked.
      softcap: ``c`` applies ``c * tanh(logits / c)`` before the softmax (Gemma 2).
      scale: logit scale, default ``H ** -0.5``.
      impl: see the module docstring.
      interpret: run Pallas paths in interpret mode (no effect on jnp paths).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``. Rows with no visible key are zeros (for
      ``cudnn``, whatever cuDNN returns).
    """
    _check_qkv(q_BTNH, k_BSKH, v_BSKH, "q_BTNH", 4)
    impl = _resolve_impl(impl, q_BTNH)
    _check_options(sliding_window, softcap)
    B, T, _, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if T > S:
        raise ValueError(f"more queries than keys: T={T} > S={S}")
    if lengths is not None:
        _check_lengths(lengths, B, "lengths")
    if scale is None:
        scale = H**-0.5
    options = dict(causal=causal, sliding_window=sliding_window, lengths=lengths)
    options.update(softcap=softcap, scale=scale)
    if impl == "cudnn":
        return _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, **options)
    if impl in _PALLAS_BACKEND:
        module = _pallas_module(impl, {"pallas_tpu": "tpu"}.get(impl, "gpu"), interpret)
        return module.flash_attention(q_BTNH, k_BSKH, v_BSKH, **options, interpret=interpret)
    if lengths is None:
        lengths = jnp.full((B,), S, jnp.int32)
    q_pos_BT = jnp.broadcast_to(S - T + jnp.arange(T, dtype=jnp.int32), (B, T))
    return _masked(
        q_BTNH, k_BSKH, v_BSKH, q_pos_BT, lengths, causal, sliding_window, softcap, scale, impl
    )


@functools.partial(jax.jit, static_argnames=_STATIC[1:])
def decode_attention(
    q_BNH,
    k_BSKH,
    v_BSKH,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    k_scale_BSK=None,
    v_scale_BSK=None,
    impl: str = "auto",
    interpret: bool = False,
):
    """One new query per sequence against a KV cache.

    Args:
      q_BNH: the query of the token at position ``lengths[b] - 1``.
      k_BSKH, v_BSKH: the cache; its first ``lengths[b]`` positions are valid and include the
        new token's own key and value. Float (the dtype of ``q``), or int8 with scales.
      lengths_B: int ``[B]`` valid cache positions per sequence.
      k_scale_BSK, v_scale_BSK: float ``[B, S, K]`` scales of an int8 cache (both or neither).

    Returns:
      ``[B, N, H]`` in the dtype of ``q``.
    """
    quantized = _check_scales(k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK)
    _check_qkv(q_BNH, k_BSKH, v_BSKH, "q_BNH", 3, quantized=quantized)
    impl = _resolve_impl(impl, q_BNH, gpu=not quantized)
    _check_options(sliding_window, softcap)
    _check_lengths(lengths_B, q_BNH.shape[0], "lengths_B")
    if scale is None:
        scale = q_BNH.shape[-1] ** -0.5
    if quantized:
        _no_int8_gpu(impl, "decode_attention")
        if impl == "pallas_tpu":
            module = _pallas_module(impl, "tpu_decode", interpret)
            return module.decode_attention_int8(
                q_BNH, k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK, lengths_B,
                sliding_window=sliding_window, softcap=softcap, scale=scale, interpret=interpret,
            )  # fmt: skip
        _require_jnp(impl, "decode_attention", ("pallas_tpu",))
        dtype = jnp.float32 if impl == "reference" else q_BNH.dtype
        k_BSKH, v_BSKH = _dequantized(k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK, dtype)
    if impl in _PALLAS_BACKEND:
        module = _pallas_module(
            impl, {"pallas_tpu": "tpu_decode"}.get(impl, "gpu_decode"), interpret
        )
        return module.decode_attention(
            q_BNH,
            k_BSKH,
            v_BSKH,
            lengths_B,
            sliding_window=sliding_window,
            softcap=softcap,
            scale=scale,
            interpret=interpret,
        )
    _require_jnp(impl, "decode_attention", tuple(_PALLAS_BACKEND))
    q_pos_BT = (lengths_B - 1)[:, None].astype(jnp.int32)
    out = _masked(
        q_BNH[:, None],
        k_BSKH,
        v_BSKH,
        q_pos_BT,
        lengths_B,
        True,
        sliding_window,
        softcap,
        scale,
        impl,
    )
    return out[:, 0]


@functools.partial(jax.jit, static_argnames=_STATIC[1:])
def cached_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    starts_B,
    lengths_B,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    k_scale_BSK=None,
    v_scale_BSK=None,
    impl: str = "auto",
    interpret: bool = False,
):
    """A chunk of ``T`` new queries per sequence against a KV cache (chunked prefill, verify).

    Generalises ``decode_attention`` to ``T > 1``: query ``t`` of sequence ``b`` sits at
    position ``starts[b] + t`` and sees cache positions ``< lengths[b]`` causally. An int8
    cache with ``k_scale_BSK`` / ``v_scale_BSK`` as in ``decode_attention`` (jnp paths only).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``q``.
    """
    quantized = _check_scales(k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK)
    _check_qkv(q_BTNH, k_BSKH, v_BSKH, "q_BTNH", 4, quantized=quantized)
    impl = _resolve_impl(impl, q_BTNH, tpu=False, gpu=not quantized)
    _check_options(sliding_window, softcap)
    B, T = q_BTNH.shape[:2]
    _check_lengths(starts_B, B, "starts_B")
    _check_lengths(lengths_B, B, "lengths_B")
    if quantized:
        _no_int8_gpu(impl, "cached_attention")
        _require_jnp(impl, "cached_attention")
        dtype = jnp.float32 if impl == "reference" else q_BTNH.dtype
        k_BSKH, v_BSKH = _dequantized(k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK, dtype)
    if impl == "pallas_gpu":
        module = _pallas_module(impl, "gpu", interpret)
        return module.cached_attention(
            q_BTNH, k_BSKH, v_BSKH, starts_B, lengths_B, sliding_window=sliding_window,
            softcap=softcap, scale=scale, interpret=interpret,
        )  # fmt: skip
    _require_jnp(impl, "cached_attention", ("pallas_gpu",))
    q_pos_BT = starts_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)
    return _masked(
        q_BTNH, k_BSKH, v_BSKH, q_pos_BT, lengths_B, True, sliding_window, softcap, scale, impl
    )


def _masked(q, k, v, q_pos_BT, kv_len_B, causal, sliding_window, softcap, scale, impl):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return reference.masked_attention(
        q,
        k,
        v,
        q_pos_BT,
        kv_len_B.astype(jnp.int32),
        causal=causal,
        sliding_window=sliding_window,
        softcap=softcap,
        scale=scale,
        precise=impl == "reference",
    )
