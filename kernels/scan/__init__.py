"""Chunked linear-recurrence scan: Mamba-2 SSD, RetNet, gated linear attention.

Per batch ``b`` and head ``h``, with a ``[K, V]`` float32 state ``S`` (``S_{-1}`` the initial
state, zeros by default) and ``G`` query/key groups shared by ``H // G`` heads each (group
``g = h // (H // G)``)::

    S_t = exp(a_t) S_{t-1} + k_t^T v_t        o_t = q_t S_t      (inclusive of token t)

with ``a_t = log_decay[b, t, h] <= 0``; or, with ``log_decay`` of shape ``[B, T, H, K]`` (one
decay per key dimension, gated linear attention: Yang et al., arXiv:2312.06635)::

    S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t        a_t = log_decay[b, t, h, :]

(the chunked vector form and its numerics: ``reference`` module docstring). Mappings: Mamba-2
SSD (Dao & Gu, arXiv:2405.21060) ``q = C, k = B, v = x * dt, a = dt * A`` (the ``D`` skip is
the caller's); RetNet (Sun et al., arXiv:2307.08621) a constant ``a = log(gamma)``; gated
linear attention ``a = log_sigmoid(gate) / tau``, per head or per key dimension. Padding: a
token with ``a = 0`` and ``k = 0`` leaves the state unchanged, so callers pad with those (there
is no mask).

Implementations (``impl``):
  ``reference``  ``lax.scan`` over tokens (``reference.naive_scan``): the oracle.
  ``xla``        the chunked form in jnp (``reference.chunked_scan``): intra-chunk quadratic
                 form, inter-chunk state carried by ``lax.scan`` over chunks.
  ``pallas_tpu`` the Pallas Mosaic TPU kernels (``tpu.py``), on a TPU or with ``interpret``:
                 grid ``(B, H, chunks)``, the state in VMEM across the sequential chunk axis;
                 backward through a reverse-sweep Pallas kernel. ``chunk_size`` a multiple of
                 8 on a TPU. A decay per key dimension: forward and backward kernels in
                 ``tpu_vector.py``. Not yet run on a TPU.
  ``pallas_gpu`` the Pallas Mosaic GPU forward kernel (``gpu.py``, Hopper wgmma), on a GPU or
                 with ``interpret``: one warpgroup per (batch, head) pipelines the chunks with
                 the state in registers; float16/bfloat16, ``chunk_size = 64``, ``K`` and ``V``
                 multiples of 64 on the GPU; backward through the ``xla`` form's VJP. On an
                 H100 its forward ran the Mamba-2 1.3B shape 10.6x faster than ``xla``
                 (README, 2026-11-27). A decay per key dimension (``gpu_vector.py``): the
                 intra-chunk scores in XLA (float32, GLA's sub-chunks), the kernel does the
                 matmuls with ``v`` and carries the state; same limits; not yet run on a GPU.
  ``auto``       ``pallas_tpu`` on a TPU backend; ``pallas_gpu`` on a Hopper GPU when its
                 limits hold (float16/bfloat16, ``K`` and ``V`` multiples of 64, one decay per
                 head: the per-key form has not run on a GPU), in chunks of 64 whatever
                 ``chunk_size`` asks (the chunking changes only the rounding); else ``xla``.

All paths accumulate in float32; differentiable in every argument but ``chunk_size``.

Example::

    o_BTHV, state_BHKV = kernels.scan.chunked_scan(q, k, v, log_decay, chunk_size=64)
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from kernels.scan import reference

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
_PALLAS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}  # impl -> backend, and its module


def _check(q, k, v, log_decay, chunk_size, initial_state):
    shapes = (
        f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}, "
        f"log_decay{tuple(log_decay.shape)}"
    )
    if (q.ndim, k.ndim, v.ndim) != (4, 4, 4) or log_decay.ndim not in (3, 4):
        raise ValueError(
            "chunked_scan expects q and k [B, T, G, K], v [B, T, H, V], log_decay [B, T, H] "
            f"or [B, T, H, K]; got {shapes}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, G, K]; got {shapes}")
    (B, T, G, _), H = q.shape, v.shape[2]
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have q's batch and length (B, T) = {(B, T)}; got {shapes}")
    if G == 0 or H % G:
        raise ValueError(f"the {G} q/k groups must divide the {H} heads of v; got {shapes}")
    if log_decay.shape not in ((B, T, H), (B, T, H, q.shape[3])):
        raise ValueError(
            f"log_decay must have shape (B, T, H) = {(B, T, H)} or (B, T, H, K) = "
            f"{(B, T, H, q.shape[3])}; got {shapes}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if initial_state is not None:
        want = (B, H, q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != want:
            raise ValueError(
                f"initial_state must have shape (B, H, K, V) = {want}; got "
                f"{tuple(initial_state.shape)} (with {shapes})"
            )
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state must be floating point, got {initial_state.dtype}")


def _resolve_impl(impl: str, q_BTGK=None, v_BTHV=None, log_decay=None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown chunked_scan impl {impl!r}; valid: {list(IMPLS)}")
    if impl == "auto":
        backend = jax.default_backend()
        if backend == "tpu":
            return "pallas_tpu"
        if backend == "gpu" and q_BTGK is not None and _gpu_fits(q_BTGK, v_BTHV, log_decay):
            return "pallas_gpu"
        return "xla"
    return impl


def _gpu_fits(q_BTGK, v_BTHV, log_decay) -> bool:
    """The GPU kernel's limits, for ``auto`` (``gpu.chunked_scan`` raises on the rest)."""
    from kernels.attention import _is_hopper

    half = (jnp.bfloat16, jnp.float16)
    dims = q_BTGK.shape[-1] % 64 == 0 and v_BTHV.shape[-1] % 64 == 0
    dtypes = q_BTGK.dtype in half and v_BTHV.dtype == q_BTGK.dtype
    return dims and dtypes and log_decay.ndim == 3 and _is_hopper()


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl", "interpret"))
def chunked_scan(
    q_BTGK,
    k_BTGK,
    v_BTHV,
    log_decay_BTH,
    *,
    chunk_size: int = 64,
    initial_state_BHKV=None,
    impl: str = "auto",
    interpret: bool = False,
):
    """Linear recurrence ``S_t = exp(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    With a ``[B, T, H, K]`` ``log_decay`` the decay is per key dimension:
    ``S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t``.

    Args:
      q_BTGK, k_BTGK: ``[B, T, G, K]`` queries and keys, group ``g`` serving heads
        ``g * H // G .. (g + 1) * H // G - 1``.
      v_BTHV: ``[B, T, H, V]`` values.
      log_decay_BTH: ``[B, T, H]`` finite ``a_t <= 0`` (computed in float32), or
        ``[B, T, H, K]``: one per key dimension.
      chunk_size: tokens per chunk (``T`` need not be a multiple; ignored by ``reference``).
      initial_state_BHKV: ``[B, H, K, V]`` state before token 0, or ``None`` for zeros.
      impl: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas_tpu"`` or ``"pallas_gpu"``
        (module docstring).
      interpret: run a Pallas path in interpret mode (CPU tests).

    Returns:
      ``(o_BTHV, final_state_BHKV)``: outputs in ``v``'s dtype; the state after the last token
      in float32.
    """
    _check(q_BTGK, k_BTGK, v_BTHV, log_decay_BTH, chunk_size, initial_state_BHKV)
    if impl == "auto":
        impl = _resolve_impl(impl, q_BTGK, v_BTHV, log_decay_BTH)
        chunk_size = 64 if impl == "pallas_gpu" else chunk_size
    impl = _resolve_impl(impl)
    args = (q_BTGK, k_BTGK, v_BTHV, log_decay_BTH.astype(jnp.float32))
    if initial_state_BHKV is not None:
        initial_state_BHKV = initial_state_BHKV.astype(jnp.float32)
    if impl == "reference":
        return reference.naive_scan(*args, initial_state_BHKV)
    if impl == "xla":
        return reference.chunked_scan(*args, initial_state_BHKV, chunk_size=chunk_size)
    backend = _PALLAS[impl]
    if jax.default_backend() != backend and not interpret:
        raise ValueError(
            f"impl={impl!r} needs a {backend.upper()} backend (running on "
            f"{jax.default_backend()!r}); pass interpret=True to run it on CPU, or use "
            "impl='xla'"
        )
    kernel = importlib.import_module(f"kernels.scan.{backend}")
    return kernel.chunked_scan(
        *args, initial_state_BHKV, chunk_size=chunk_size, interpret=interpret
    )
