"""Mixture-of-experts channel block: top-k softmax router, routed experts, optional shared one.

Mixtral (Jiang et al., arXiv:2401.04088 §2.1): softmax over the router logits, keep the top
``k`` experts, renormalise their probabilities (``router_renormalize``; Qwen2-MoE keeps the raw
softmax values), output ``sum_k p_k * expert_k(x)``. Qwen2-MoE / DeepSeekMoE add an always
active shared expert (``shared_ffn_dim``), scaled by ``sigmoid(x . w_gate)`` when
``shared_expert_gate``. Experts are gated MLPs per ``cfg.mlp`` (SwiGLU for both families).

Two dispatch paths (``cfg.moe_dispatch``), equal whenever nothing is dropped:

* ``"dropless"`` (MegaBlocks, arXiv:2211.15841): the ``G * k`` (token, expert) assignments are
  sorted by expert and run through ``kernels.moe.grouped_matmul``; no token is ever dropped.
  Every token's output depends on its own row only, so padding rows (ragged prefill, finished
  decode rows) are computed and ignored without changing real tokens.
* ``"capacity"`` (GShard arXiv:2006.16668 §2.2, Switch arXiv:2101.03961 §2.2): each expert
  gets ``C = ceil(capacity_factor * G * k / E)`` slots for the ``G = B * T`` tokens of the
  call. Slots are filled in GShard's priority: every token's first choice in token order
  (row-major over ``[B, T]``), then every second choice, and so on; assignments past ``C``
  are dropped (they contribute zero; the residual carries the token) and counted in
  ``dropped_fraction``. Padding tokens compete for capacity like real ones, and because
  ``C`` depends on the tokens per call, a cached decode equals the full forward only when
  nothing drops.

Auxiliary outputs (float32, per call): ``load_balance_loss`` = ``E * sum_e f_e * P_e`` with
``f_e`` the top-k assignments to expert ``e`` per token (summing to ``k``) and ``P_e`` the mean
router probability, exactly ``transformers``' ``load_balancing_loss_func`` for one layer
(Switch eq. 4 generalised to top-k); ``z_loss`` = ``mean(logsumexp(logits)^2)`` (ST-MoE,
arXiv:2202.08906 eq. 5); ``tokens_per_expert`` (assignments routed, before any drop),
``dropped_fraction`` (0 for dropless). ``combine_aux`` pools them over layers for ``models.lm``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import kernels.moe
from models.configs import ModelConfig
from models.expert_parallel import expert_parallel_ffn
from models.layers import Einsum, param
from models.layers.linear import shard_weight
from models.mlp import _ACTIVATIONS, MLP
from partitioning.rules import active_sharding

_GATED = ("swiglu", "geglu")


def capacity(tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert of the ``"capacity"`` dispatch for ``tokens`` tokens in one call."""
    return max(1, math.ceil(cfg.capacity_factor * tokens * cfg.experts_per_token / cfg.num_experts))


class MoE(nnx.Module):
    """Top-k routed experts (``[E, D, F]`` gate/up, ``[E, F, D]`` down) plus a shared expert.

    ``__call__(x_BTD) -> (y_BTD, aux)`` with ``aux`` a dict of float32 router statistics (see
    the module docstring).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        if cfg.num_experts < 1:
            raise ValueError(f"a 'moe' channel block needs num_experts >= 1, got {cfg.num_experts}")
        if not 1 <= cfg.experts_per_token <= cfg.num_experts:
            raise ValueError(
                f"experts_per_token={cfg.experts_per_token} must be in 1..num_experts="
                f"{cfg.num_experts}"
            )
        D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.dtype = dt
        self.act = _ACTIVATIONS[cfg.mlp]
        # Router logits in float32 (inputs and weights cast up): top-k is sensitive to rounding.
        self.router = Einsum(
            "GD,DE->GE",
            (D, E),
            ("embed", None),
            std=cfg.init_std,
            param_dtype=pdt,
            dtype=jnp.float32,
            out_dtype=jnp.float32,
            rngs=rngs,
        )
        init = nnx.initializers.normal(cfg.init_std)
        self.gate = (
            param(rngs, init, (E, D, F), ("experts", "embed", "mlp"), pdt)
            if cfg.mlp in _GATED
            else None
        )
        self.up = param(rngs, init, (E, D, F), ("experts", "embed", "mlp"), pdt)
        self.down = param(rngs, init, (E, F, D), ("experts", "mlp", "embed"), pdt)
        shared = cfg.shared_ffn_dim > 0
        self.shared = (
            MLP(cfg.replace(ffn_dim=cfg.shared_ffn_dim), layer, rngs=rngs) if shared else None
        )
        self.shared_gate = (
            Einsum(
                "BTD,DO->BTO",
                (D, 1),
                ("embed", None),
                std=cfg.init_std,
                param_dtype=pdt,
                dtype=dt,
                rngs=rngs,
            )
            if shared and cfg.shared_expert_gate
            else None
        )

    def __call__(self, x_BTD):
        cfg = self.cfg
        B, T, D = x_BTD.shape
        E, K = cfg.num_experts, cfg.experts_per_token
        x_GD = x_BTD.reshape(B * T, D).astype(self.dtype)
        logits_GE = self.router(x_GD)
        probs_GE = jax.nn.softmax(logits_GE, axis=-1)
        weights_GK, experts_GK = jax.lax.top_k(probs_GE, K)
        if cfg.router_renormalize:
            weights_GK = weights_GK / weights_GK.sum(-1, keepdims=True)
        expert_parallel = self._expert_parallel(B * T)
        if expert_parallel is not None:
            y_GD, dropped_count = expert_parallel(x_GD, experts_GK, weights_GK)
            dropped = dropped_count.astype(jnp.float32) / (B * T * K)
        elif cfg.moe_dispatch == "dropless":
            y_GKD = self._dropless(x_GD, experts_GK)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y_GKD, kept_GK = self._capacity(x_GD, experts_GK)
            dropped = jnp.mean(~kept_GK, dtype=jnp.float32)
        if expert_parallel is None:
            y_GD = jnp.einsum("GKD,GK->GD", y_GKD.astype(jnp.float32), weights_GK)
        y_BTD = y_GD.reshape(B, T, D).astype(jnp.float32)
        if self.shared is not None:
            s_BTD = self.shared(x_BTD).astype(jnp.float32)
            if self.shared_gate is not None:
                s_BTD = jax.nn.sigmoid(self.shared_gate(x_BTD).astype(jnp.float32)) * s_BTD
            y_BTD = y_BTD + s_BTD
        counts_E = jnp.zeros((E,), jnp.float32).at[experts_GK.reshape(-1)].add(1.0)
        fraction_E = counts_E / (B * T)
        prob_E = probs_GE.mean(axis=0)
        aux = {
            "load_balance_loss": E * jnp.sum(fraction_E * prob_E),
            "z_loss": jnp.mean(jax.nn.logsumexp(logits_GE, axis=-1) ** 2),
            "expert_fraction": fraction_E,
            "router_prob": prob_E,
            "tokens_per_expert": counts_E,
            "dropped_fraction": dropped,
        }
        return y_BTD.astype(self.dtype), aux

    def _expert_parallel(self, tokens: int):
        """The expert-parallel FFN (``models.expert_parallel``) when the active partitioning
        rules put the ``experts`` axis on one mesh axis of size ``n > 1`` that divides ``E``
        and the ``tokens`` divide over the token shards; else ``None`` (one-program path).

        Tokens are split over ``(act_batch's mesh axis, experts' mesh axis)``. ``"capacity"``
        dispatch then bounds each per-destination-shard buffer at ``capacity_factor * t * k /
        n`` (Switch's per-device capacity), which drops differently from the one-program
        per-expert buffers; both agree whenever nothing drops. Non-gated experts stay on the
        one-program path.
        """
        active = active_sharding()
        if active is None or self.gate is None:
            return None
        mesh, rules = active
        axis = rules.get("experts")
        if not isinstance(axis, str) or mesh.shape.get(axis, 1) < 2:
            return None
        if self.cfg.num_experts % mesh.shape[axis]:
            return None
        data_axis = rules.get("act_batch")
        if not isinstance(data_axis, str) or data_axis == axis or mesh.shape.get(data_axis, 1) < 2:
            data_axis = None
        shards = mesh.shape[axis] * (1 if data_axis is None else mesh.shape[data_axis])
        if tokens % shards:
            return None
        gate, up, down = self._weights()
        cfg = self.cfg

        def run(x_GD, experts_GK, weights_GK):
            return expert_parallel_ffn(
                x_GD,
                experts_GK,
                weights_GK,
                gate,
                up,
                down,
                mesh=mesh,
                axis=axis,
                data_axis=data_axis,
                capacity_factor=cfg.capacity_factor if cfg.moe_dispatch == "capacity" else None,
                activation=self.act,
                impl=cfg.moe_impl,
                interpret=cfg.moe_interpret,
            )

        return run

    def _weights(self):
        cast = lambda v: None if v is None else shard_weight(v).astype(self.dtype)
        return cast(self.gate), cast(self.up), cast(self.down)

    def _dropless(self, x_GD, experts_GK):
        """Assignments sorted by expert through the grouped matmul. Returns ``[G, K, D]``."""
        G, K = experts_GK.shape
        E = self.cfg.num_experts
        e_A = experts_GK.reshape(-1)  # assignment a = g * K + k
        order_A = jnp.argsort(e_A, stable=True)
        sizes_E = jnp.bincount(e_A, length=E).astype(jnp.int32)
        x_AD = x_GD[order_A // K]
        gate, up, down = self._weights()
        mm = lambda x, w: kernels.moe.grouped_matmul(
            x, w, sizes_E, impl=self.cfg.moe_impl, interpret=self.cfg.moe_interpret
        )
        h_AF = mm(x_AD, up)
        h_AF = self.act(mm(x_AD, gate)) * h_AF if gate is not None else self.act(h_AF)
        y_AD = mm(h_AF, down)
        inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(G * K))
        return y_AD[inverse_A].reshape(G, K, -1)

    def _capacity(self, x_GD, experts_GK):
        """GShard buffers of ``C`` slots per expert. Returns ``[G, K, D]`` and kept ``[G, K]``."""
        G, K = experts_GK.shape
        E, C = self.cfg.num_experts, capacity(G, self.cfg)
        e_A = experts_GK.T.reshape(-1)  # assignment a = k * G + g: first choices first
        onehot_AE = jax.nn.one_hot(e_A, E, dtype=jnp.int32)
        slot_A = jnp.sum(jnp.cumsum(onehot_AE, axis=0) * onehot_AE, axis=-1) - 1
        kept_A = slot_A < C
        slot_A = jnp.where(kept_A, slot_A, C)  # out of bounds: the scatter drops it
        tok_A = jnp.tile(jnp.arange(G), K)
        buf_ECD = jnp.zeros((E, C, x_GD.shape[1]), x_GD.dtype)
        buf_ECD = buf_ECD.at[e_A, slot_A].set(x_GD[tok_A], mode="drop")
        gate, up, down = self._weights()
        f32 = jnp.float32
        h_ECF = jnp.einsum("ECD,EDF->ECF", buf_ECD, up, preferred_element_type=f32)
        if gate is not None:
            g_ECF = jnp.einsum("ECD,EDF->ECF", buf_ECD, gate, preferred_element_type=f32)
            h_ECF = self.act(g_ECF) * h_ECF
        else:
            h_ECF = self.act(h_ECF)
        out_ECD = jnp.einsum(
            "ECF,EFD->ECD", h_ECF.astype(self.dtype), down, preferred_element_type=f32
        )
        y_AD = out_ECD.at[e_A, slot_A].get(mode="fill", fill_value=0)
        y_GKD = y_AD.reshape(K, G, -1).transpose(1, 0, 2)
        return y_GKD, kept_A.reshape(K, G).T


def combine_aux(auxes: list[dict], cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """The weighted auxiliary loss and router statistics of a model's MoE layers.

    The load-balancing loss pools the layers as ``transformers`` does (it concatenates every
    layer's router logits): ``E * sum_e mean_l(f_le) * mean_l(P_le)``, equal to HF Mixtral's /
    Qwen2-MoE's ``aux_loss`` for an unpadded batch. The z-loss is the mean over layers.

    Returns:
      ``(aux_loss, router_stats)``: ``router_aux_loss_coef * load_balance +
      router_z_loss_coef * z_loss`` (float32 scalar), and a dict with those two pooled values
      plus each per-layer statistic stacked over the MoE layers (``[L_moe]`` or ``[L_moe, E]``).
    """
    stats = {key: jnp.stack([a[key] for a in auxes]) for key in auxes[0]}
    load_balance = cfg.num_experts * jnp.sum(
        stats["expert_fraction"].mean(0) * stats["router_prob"].mean(0)
    )
    z_loss = stats["z_loss"].mean()
    router_stats = {
        **{f"layer_{key}": value for key, value in stats.items()},
        "load_balance_loss": load_balance,
        "z_loss": z_loss,
        "dropped_fraction": stats["dropped_fraction"].mean(),
    }
    aux_loss = cfg.router_aux_loss_coef * load_balance + cfg.router_z_loss_coef * z_loss
    return aux_loss.astype(jnp.float32), router_stats
