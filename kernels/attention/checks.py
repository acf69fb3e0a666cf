"""Input checks the Pallas attention kernels share (``tpu.py``, ``gpu.py``, ``tpu_decode.py``,
``gpu_decode.py``), so that each public kernel entry point raises the same one-line errors.
Backend-specific rules (dtypes, head dims) stay with each kernel."""

from __future__ import annotations

import jax.numpy as jnp


def check_flash(q_BTNH, k_BSKH, v_BSKH, sliding_window, softcap) -> None:
    """q ``[B, T, N, H]`` against k, v ``[B, S, K, H]``; a positive window and softcap."""
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape:
        raise ValueError(
            f"need q [B, T, N, H] and k, v [B, S, K, H] of equal shapes, got "
            f"{q_BTNH.shape}, {k_BSKH.shape}, {v_BSKH.shape}"
        )
    B, _, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H or N % K:
        raise ValueError(f"q {q_BTNH.shape} vs k {k_BSKH.shape}: need equal B, H and N % K == 0")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


def kv_lengths(lengths, B: int, S: int, name: str = "lengths"):
    """``lengths`` checked to be int ``[B]`` and clipped to ``[0, S]``; ``S`` for ``None``."""
    if lengths is None:
        return jnp.full((B,), S, jnp.int32)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array of shape ({B},), got {lengths.shape}")
    return jnp.clip(lengths.astype(jnp.int32), 0, S)


def check_decode(q_BNH, k_BSKH, v_BSKH, lengths_B) -> None:
    """q ``[B, N, H]`` (float) against a ``[B, S, K, H]`` cache; int ``[B]`` lengths."""
    B, N, H = q_BNH.shape
    if k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape or k_BSKH.dtype != v_BSKH.dtype:
        raise ValueError(
            f"k and v must be [B, S, K, H] of equal shape and dtype, got {k_BSKH.shape} "
            f"{k_BSKH.dtype} and {v_BSKH.shape} {v_BSKH.dtype}"
        )
    K = k_BSKH.shape[2]
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H or N % K:
        raise ValueError(f"q {q_BNH.shape} does not match cache {k_BSKH.shape} (N % K == 0)")
    if lengths_B.shape != (B,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        raise ValueError(f"lengths_B must be an integer array of shape ({B},)")
    if not jnp.issubdtype(q_BNH.dtype, jnp.floating):
        raise ValueError(f"q must be a float array, got {q_BNH.dtype}")
