"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p, Holtzman et al. 2019)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits_BV, key, *, greedy: bool, temperature, top_k: int | None, top_p):
    """One token per row.

    Args:
      logits_BV: float32 logits.
      key: PRNG key (unused when greedy).
      greedy: static; argmax, ignoring the other options.
      temperature: scalar > 0 dividing the logits.
      top_k: static; keep the ``top_k`` largest logits.
      top_p: scalar in ``(0, 1]`` or ``None``; keep the smallest set of tokens whose
        probability reaches ``top_p`` (the most likely token is always kept).

    Returns:
      int32 ``[B]``.
    """
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        num_kept_B = jnp.sum(mass_before_BV < top_p, axis=-1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, num_kept_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
