"""Sparse upcycling: a dense model's MLPs become mixture-of-experts layers of identical experts.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(arXiv:2212.05055 §3): every expert of an upcycled layer starts as a copy of the dense MLP, the
router starts from scratch, and all other weights are carried over. With renormalised top-k
weights (they sum to 1) each token's output is then exactly the dense MLP's, so the upcycled
model computes the dense model's logits at initialisation and training starts from the dense
model's loss.

    moe_model = models.upcycle(dense_model, num_experts=8, experts_per_token=2)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from models.configs import shortest_cycle
from models.lm import LM, build


def _flat(model) -> dict:
    """``{path: Param}``; the Params are the model's own, so assigning to them updates it."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    return dict(flat)


def upcycle(
    dense: LM,
    *,
    num_experts: int,
    experts_per_token: int = 2,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    **moe_overrides,
) -> LM:
    """An MoE model whose experts are copies of ``dense``'s MLPs (logits equal at init).

    Args:
      dense: a model whose upcycled layers have ``"mlp"`` channel blocks without biases.
      num_experts, experts_per_token: ``E`` and top-``k`` of the new layers.
      layers: the layers to upcycle; ``None`` means every layer (Komatsuzaki et al. upcycle
        every other layer in some runs: pass ``range(1, L, 2)``).
      seed: initialisation of the routers (the only new weights).
      **moe_overrides: other ``ModelConfig`` fields of the result (``moe_dispatch``,
        ``capacity_factor``, ``router_aux_loss_coef``, ...).

    Returns:
      A new ``LM`` with ``router_renormalize=True`` and ``moe_ffn_dim`` = the dense ``ffn_dim``.

    Raises:
      ValueError: a listed layer is not a bias-free MLP layer, or an override would break the
        equality at initialisation (``router_renormalize=False``, a shared expert).
    """
    cfg = dense.config
    L = cfg.num_layers
    layers = tuple(range(L)) if layers is None else tuple(sorted(set(layers)))
    bad = [i for i in layers if not 0 <= i < L or cfg.channel(i) != "mlp"]
    if bad:
        raise ValueError(f"layers {bad} are not MLP layers of this {L}-layer model")
    if cfg.mlp_bias:
        raise ValueError("upcycling needs bias-free MLPs (the experts have no biases)")
    for field, breaks in (("router_renormalize", False), ("shared_ffn_dim", None)):
        if field in moe_overrides and (breaks is None or moe_overrides[field] == breaks):
            raise ValueError(
                f"{field}={moe_overrides[field]!r} would make the upcycled model differ from "
                f"the dense one at initialisation"
            )
    pattern = shortest_cycle(tuple("moe" if i in layers else cfg.channel(i) for i in range(L)))
    moe_cfg = cfg.replace(
        name=f"{cfg.name}-upcycled-{num_experts}x",
        channel_pattern=pattern,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_ffn_dim=cfg.ffn_dim,
        router_renormalize=True,
        shared_ffn_dim=0,
        **moe_overrides,
    )
    model = build(moe_cfg, seed=seed)
    source, target = _flat(dense), _flat(model)
    for path, variable in target.items():
        if path[-1] == "kernel" and path[-2] == "router":
            continue  # new weights: the router learns from scratch
        if len(path) == 4 and path[0] == "blocks" and path[2] == "channel":
            # an expert weight [E, ...]: every expert is the dense matrix
            dense_w = source[(*path, "kernel")][...]
            variable[...] = jnp.broadcast_to(dense_w, variable.shape).astype(variable.dtype)
        elif path in source:
            variable[...] = source[path][...]
        else:
            raise ValueError(f"no dense weight for {'/'.join(map(str, path))}")
    return model
