"""Analytical cost of one inference step of a transformer (dense or MoE) under a layout.

The model of Pope et al. 2022, "Efficiently Scaling Transformer Inference" (arXiv:2211.05102,
§2-3 and Appendix A), with the roofline conventions of Austin et al., "How To Scale Your Model"
(the scaling book, parts 1, 3 and 7). Per layer it counts, on one chip:

- FLOPs: ``2 x tokens x weight elements`` of every projection the chip holds at use time
  (replicated pieces count on every chip that recomputes them), plus attention
  ``4 x queries x keys x heads x head_dim`` (causal prefill counts half the square; a
  sliding window caps the keys).
- HBM bytes: the weights used (in ``weights_dtype``) and the KV cache read (decode) or
  written (prefill). Activation traffic is neglected, as in Pope et al. §2.
- Collectives (kind, mesh axes, bytes per chip) of the layout's algorithm, which the
  ``partitioning.layouts`` rules make XLA emit (checked against compiled HLO in
  ``tests/partitioning/test_hlo_matches_cost.py``):

  residual ``[B, T, E_(x,model)]`` -> all-gather over ``model`` -> ``[B, T, E_x]`` ->
  projections with weights ``[E_x, F_model]`` (partial sums over ``x``: all-reduce over ``x``)
  -> output projection ``[F_model, E_x]`` (partial sums over ``model``: reduce-scatter over
  ``model``) -> residual. This is Pope et al.'s 2D weight-stationary algorithm (§3.2.2), with
  ``x = 1`` the 1D one (§3.2.1); it moves ``2BLE/X`` bytes over ``model`` and ``2BLF/M``
  over ``x`` per matrix pair (Pope's reduce-scatter + all-gather over ``x`` of the hidden is
  the all-reduce here). Weight-gathered layouts (§3.2.3) add an all-gather of every weight
  over ``gather``; batch-sharded attention (§3.3) adds two all-to-alls over ``model``.

Mixture-of-experts layers (``cfg.channel(layer) == "moe"``, ``Layout.experts``): FLOPs count
the router, the shared expert and ``k`` of the ``E`` routed experts per token; HBM bytes count
the experts the step's tokens touch (``expert_fraction_read``: uniform routing, and for
expert-parallel the busiest chip); memory counts every expert. ``tensor_parallel`` experts
split each expert's hidden over ``model`` and communicate like the dense FFN;
``expert_parallel`` experts live whole on the chips of ``model`` and the tokens travel by
two all-to-alls (plus one of int32 expert ids, ``expert_parallel_comms``, checked against the
HLO of ``models.expert_parallel`` in ``tests/partitioning/test_moe_cost.py``) and one more
all-to-all back to the residual's ``d_model`` split.

Mamba-2 layers (``cfg.mixer(layer) == "mamba2"``, ``models.ssm``; Dao & Gu, arXiv:2405.21060):
their projections name only ``embed`` as a logical axis, so tensor parallelism replicates
them over ``model`` (every chip of a model group computes the whole layer for the group's
sequences; the in-projection's partial sums over ``x`` are all-reduced). FLOPs: the
projections and the depthwise conv (``2 x tokens x weight elements``) plus the scan,
``ssm_scan_flops``. HBM bytes: the weights, and the decode state (``ssm_state_bytes`` per
sequence: ``W - 1`` conv inputs in the activation dtype and the float32 ``[H, N, P]`` state),
read and written at decode, written at prefill. The state does not grow with the context:
it counts in ``kv_bytes_per_chip`` and ``state_bytes_per_chip`` but not in
``kv_bytes_per_token_per_chip``, and ``max_context`` of a model without attention layers is
``None`` (unbounded) when the state fits.

Linear-attention layers (``"based"``, ``"gla"``, ``"retnet"``, ``models.linear_attention``)
count like Mamba-2 for the state and the scan: the float32 ``[N, K, V]`` state per sequence
(``recurrent_state_bytes``; Based's ``K = 1 + d' + d'^2`` and ``V + 1``) and
``recurrent_scan_flops`` (Mamba-2's formula with ``K``, ``V`` and ``linear_attn_chunk_size``).
Their weights are the model's (head-sharded like attention); their collectives are modelled
as attention's (an approximation: the q/k/v partial sums are attention's width). Their 2-D
per-head biases and norm scales count as matrices (``2 x tokens x elements`` FLOPs, negligible).

Collective time (scaling book part 3): with ``p`` chips in the group and per-chip bandwidth
``W`` (``Layout.link_bandwidth``), all-gather of a ``b``-byte result and reduce-scatter of a
``b``-byte operand take ``b (p - 1) / p / W``, all-reduce twice that, all-to-all
``b (p - 1) / p x max(1, p / 4) / W`` on a torus (a bidirectional ring's mean hop distance
is ``p / 4``). Assumptions: compute and HBM traffic overlap perfectly (the roofline), but
collectives do not overlap with either: a layer costs ``max(compute, memory) + comm``, an
upper bound that Pope et al. §3.5 narrow with looped collective einsums.
"""

from __future__ import annotations

import dataclasses
import math

from partitioning.layouts import Layout, check_divides
from partitioning.rules import num_shards, spec_for

WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5, "f32": 4.0}
KV_BYTES = {"bf16": 2.0, "int8": 1.0, "f32": 4.0}
PHASES = ("prefill", "decode")
_NORM_STAT_BYTES = 4  # one float32 per token: the mean square of a sharded residual


def layer_weights(cfg, layer: int = 0) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, logical axes) of one layer's weights, as ``models`` builds them.

    A ``"moe"`` layer (``cfg.channel(layer)``) has a router, ``E`` experts (names starting
    ``expert_``) and, with ``shared_ffn_dim``, a shared dense expert (``shared_``) and its gate.
    """
    E, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    gated = cfg.mlp in ("swiglu", "geglu")
    mixer = cfg.mixer(layer)
    ssm, lin, lru = mixer == "mamba2", mixer in LINEAR_ATTENTION_MIXERS, mixer == "rglru"
    out = [
        ("q", (E, N, H), ("embed", "heads", "head_dim")),
        ("k", (E, K, H), ("embed", "kv_heads", "head_dim")),
        ("v", (E, K, H), ("embed", "kv_heads", "head_dim")),
        ("o", (N, H, E), ("heads", "head_dim", "embed")),
    ]
    if ssm:
        out = _ssm_weights(cfg)
    elif lru:
        out = _rglru_weights(cfg)
    elif lin:
        out = _linear_attention_weights(cfg, layer)
    out.append(("mixer_norm", (E,), ("norm",)))
    if cfg.channel(layer) == "none":
        return out
    if cfg.channel(layer) == "moe":
        X, Fe = cfg.num_experts, cfg.expert_ffn_dim
        out.append(("router", (E, X), ("embed", None)))
        out += [
            ("expert_up", (X, E, Fe), ("experts", "embed", "mlp")),
            ("expert_down", (X, Fe, E), ("experts", "mlp", "embed")),
        ]
        if gated:
            out.append(("expert_gate", (X, E, Fe), ("experts", "embed", "mlp")))
        if cfg.shared_ffn_dim:
            out += [("shared_" + n, s, a) for n, s, a in _mlp_weights(cfg, cfg.shared_ffn_dim)]
            if cfg.shared_expert_gate:
                out.append(("shared_gate", (E, 1), ("embed", None)))
    else:
        out += _mlp_weights(cfg, F)
    if not cfg.parallel_block:
        out.append(("channel_norm", (E,), ("norm",)))
    if cfg.qkv_bias and not (ssm or lin or lru):
        out += [
            ("q_bias", (N, H), ("heads", "head_dim")),
            ("k_bias", (K, H), ("kv_heads", "head_dim")),
            ("v_bias", (K, H), ("kv_heads", "head_dim")),
        ]
    if cfg.out_bias and not (ssm or lin or lru):
        out.append(("o_bias", (E,), ("embed",)))
    return out


def _ssm_weights(cfg) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """A Mamba-2 mixer's weights (``models.ssm.Mamba2``); the conv ``[W, C]`` counts as a
    matrix, its ``2 x W x C`` FLOPs per token being the depthwise conv's."""
    E, inner, Hs = cfg.d_model, cfg.ssm_intermediate, cfg.ssm_heads
    C = inner + 2 * cfg.ssm_groups * cfg.ssm_state_size
    out = [
        ("in_proj", (E, inner + C + Hs), ("embed", None)),
        ("conv", (cfg.ssm_conv_kernel, C), (None, None)),
        ("dt_bias", (Hs,), (None,)),
        ("A_log", (Hs,), (None,)),
        ("D", (Hs,), (None,)),
        ("gate_norm", (inner,), ("norm",)),
        ("out_proj", (inner, E), (None, "embed")),
    ]
    if cfg.ssm_conv_bias:
        out.append(("conv_bias", (C,), (None,)))
    if cfg.ssm_bias:
        out += [("in_proj_bias", (inner + C + Hs,), (None,)), ("out_proj_bias", (E,), ("embed",))]
    return out


def ssm_state_bytes(cfg, act_bytes: float = 2.0) -> float:
    """Decode state of one Mamba-2 layer for one sequence: the last ``W - 1`` conv inputs
    (``C = I + 2GN`` channels, ``act_bytes`` each) and the float32 ``[H, N, P]`` SSM state."""
    C = cfg.ssm_intermediate + 2 * cfg.ssm_groups * cfg.ssm_state_size
    ssm = cfg.ssm_heads * cfg.ssm_state_size * cfg.ssm_head_dim * 4
    return (cfg.ssm_conv_kernel - 1) * C * act_bytes + ssm


def ssm_scan_flops(cfg, sequences: int, tokens: int, phase: str) -> float:
    """FLOPs of one Mamba-2 layer's scan for ``sequences`` x ``tokens`` new tokens, per head.

    Decode (the recurrent step): ``S = exp(a) S + k^T v`` and ``o = q S``, ``5 N P``.
    Prefill (the chunked SSD form of arXiv:2405.21060 §6 with chunk ``Q``): causal
    intra-chunk scores and their values ``Q (N + P)`` (half of ``2 Q (N + P)``), the chunk's
    state contribution and the state's output ``4 N P``.
    """
    N, P, Q = cfg.ssm_state_size, cfg.ssm_head_dim, cfg.ssm_chunk_size
    per_token = 5 * N * P if phase == "decode" else min(Q, tokens) * (N + P) + 4 * N * P
    return sequences * tokens * cfg.ssm_heads * per_token


LINEAR_ATTENTION_MIXERS = ("based", "gla", "retnet")
RECURRENT_MIXERS = ("mamba2", *LINEAR_ATTENTION_MIXERS, "rglru")
RING_BUFFER_MIXERS = ("local_attention",)  # sliding-window caches of ``window`` slots


def _rglru_weights(cfg) -> list[tuple[str, tuple[int, ...], tuple]]:
    """An ``"rglru"`` block's weights (``models.griffin.RGLRUBlock``): ``linear_y``,
    ``linear_x``, ``linear_out`` (with biases), the depthwise conv ``[W, R]`` (a matrix: its
    ``2 W R`` FLOPs per token are the conv's) and bias, the block-diagonal gates
    ``[N, R / N, R / N]`` (``2 R^2 / N`` FLOPs per token each) with ``[N, R / N]`` biases
    (counted as matrices, negligible), and ``a_param`` ``[R]``."""
    D, R, N, W = cfg.d_model, cfg.rnn_width, cfg.rnn_heads, cfg.lru_conv_width
    gate, gate_bias = ((N, R // N, R // N), ("heads", None, None)), ((N, R // N), ("heads", None))
    return [
        ("linear_y", (D, R), ("embed", "mlp")),
        ("linear_y_bias", (R,), ("mlp",)),
        ("linear_x", (D, R), ("embed", "mlp")),
        ("linear_x_bias", (R,), ("mlp",)),
        ("linear_out", (R, D), ("mlp", "embed")),
        ("linear_out_bias", (D,), ("embed",)),
        ("conv_w", (W, R), (None, "mlp")),
        ("conv_b", (R,), ("mlp",)),
        ("input_gate_w", *gate),
        ("input_gate_b", *gate_bias),
        ("a_gate_w", *gate),
        ("a_gate_b", *gate_bias),
        ("a_param", (R,), ("mlp",)),
    ]


def rglru_state_bytes(cfg, act_bytes: float = 2.0) -> float:
    """Decode state of one ``"rglru"`` layer for one sequence (``RGLRUState``): the last
    ``W - 1`` conv inputs ``[W - 1, R]`` in the compute dtype and the float32 ``h`` ``[R]``."""
    R = cfg.rnn_width
    return (cfg.lru_conv_width - 1) * R * act_bytes + R * 4


def _linear_attention_weights(cfg, layer: int) -> list[tuple[str, tuple[int, ...], tuple]]:
    """The weights of a ``"based"`` / ``"gla"`` / ``"retnet"`` mixer, as the model names them."""
    E, N, V, mixer = cfg.d_model, cfg.lin_heads, cfg.lin_value_dim, cfg.mixer(layer)
    K = cfg.linear_attn_feature_dim if mixer == "based" else cfg.lin_key_dim
    into, per_head = ("embed", "heads", "head_dim"), ("heads", "head_dim")
    out = [("q", (E, N, K), into), ("k", (E, N, K), into), ("v", (E, N, V), into)]
    out.append(("o", (N, V, E), ("heads", "head_dim", "embed")))
    if mixer != "based":
        out += [("r" if mixer == "gla" else "g", (E, N, V), into), ("head_norm", (N, V), per_head)]
    if mixer == "gla":
        R = cfg.gla_gate_rank
        out += [
            ("r_bias", (N, V), per_head),
            ("gate_down", (E, R), ("embed", None)),
            ("gate_up", (R, N, K), (None, "heads", "head_dim")),
            ("gate_up_bias", (N, K), per_head),
        ]
    return out


def linear_attention_state(cfg, layer: int) -> tuple[int, int, int]:
    """``(N, K, V)`` of a linear-attention layer's float32 state ``[N, K, V]`` per sequence."""
    N, V = cfg.lin_heads, cfg.lin_value_dim
    if cfg.mixer(layer) == "based":  # Taylor features; values plus the normaliser column
        F = cfg.linear_attn_feature_dim
        return N, 1 + F + F * F, V + 1
    return N, cfg.lin_key_dim, V


def recurrent_state_bytes(cfg, layer: int, act_bytes: float = 2.0) -> float:
    """Decode state of one recurrent layer (``RECURRENT_MIXERS``) for one sequence."""
    if cfg.mixer(layer) == "mamba2":
        return ssm_state_bytes(cfg, act_bytes)
    if cfg.mixer(layer) == "rglru":
        return rglru_state_bytes(cfg, act_bytes)
    return math.prod(linear_attention_state(cfg, layer)) * 4


def recurrent_scan_flops(cfg, layer: int, sequences: int, tokens: int, phase: str) -> float:
    """``ssm_scan_flops`` of a recurrent layer: Mamba-2's, or the same recurrence (decode
    ``5 K V`` per head-token; prefill ``Q (K + V) + 4 K V`` with ``Q = linear_attn_chunk_size``)
    for a linear-attention layer's ``[K, V]`` state; for ``"rglru"`` the elementwise
    recurrence per channel and token, in both phases: ``b = x i sqrt(1 - a^2)`` (2),
    ``h = a h + b`` (2) and the output gate ``h y`` (1), ``5 R`` (the gates' sigmoids and
    exponentials are not counted, like other activations)."""
    if cfg.mixer(layer) == "mamba2":
        return ssm_scan_flops(cfg, sequences, tokens, phase)
    if cfg.mixer(layer) == "rglru":
        return sequences * tokens * 5 * cfg.rnn_width
    N, K, V = linear_attention_state(cfg, layer)
    Q = cfg.linear_attn_chunk_size
    per_token = 5 * K * V if phase == "decode" else min(Q, tokens) * (K + V) + 4 * K * V
    return sequences * tokens * N * per_token


def _mlp_weights(cfg, F: int) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    E = cfg.d_model
    out = [("up", (E, F), ("embed", "mlp")), ("down", (F, E), ("mlp", "embed"))]
    if cfg.mlp in ("swiglu", "geglu"):
        out.append(("gate", (E, F), ("embed", "mlp")))
    if cfg.mlp_bias:
        out += [("up_bias", (F,), ("mlp",)), ("down_bias", (E,), ("embed",))]
        if cfg.mlp in ("swiglu", "geglu"):
            out.append(("gate_bias", (F,), ("mlp",)))
    return out


def model_weights(cfg) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """Embedding, output head and final norm (the weights outside the layer stack)."""
    out = [("embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))]
    out.append(("final_norm", (cfg.d_model,), ("norm",)))
    if not cfg.tie_embeddings:
        out.append(("lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab")))
    return out


@dataclasses.dataclass(frozen=True)
class Comm:
    """One collective on one chip: ``kind`` over mesh ``axes``, bytes in and out, seconds."""

    kind: str
    axes: tuple[str, ...]
    operand_bytes: float
    result_bytes: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class LayerCost:
    flops: float
    hbm_bytes: float
    comms: tuple[Comm, ...]

    @property
    def comm_bytes(self) -> float:
        return sum(max(c.operand_bytes, c.result_bytes) for c in self.comms)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A step's predicted cost on one chip; see ``estimate``."""

    layout: Layout
    phase: str
    batch: int
    context: int
    step_time_s: float
    compute_s: float
    memory_s: float
    comm_s: float
    flops_per_chip: float
    hbm_bytes_per_chip: float
    comm_bytes_per_chip: float
    model_flops: float
    unique_bytes: float
    params_bytes_per_chip: float
    kv_bytes_per_chip: float
    activation_bytes_per_chip: float
    kv_bytes_per_token_per_chip: float
    sequences_per_chip: int
    batch_shards: int
    peak_flops: float
    layers: tuple[LayerCost, ...]
    total_params: float = 0.0
    active_params: float = 0.0
    weight_bytes_read: float = 0.0
    state_bytes_per_chip: float = 0.0  # recurrent decode state, constant in the context
    # Ring-buffer (``"local_attention"``) caches at their full ``window`` slots: the bound of
    # their share of ``kv_bytes_per_chip`` (``min(context, window)`` slots), whatever the context.
    window_bytes_per_chip: float = 0.0

    @property
    def tokens(self) -> int:
        return self.batch * (self.context if self.phase == "prefill" else 1)

    @property
    def memory_per_chip_bytes(self) -> float:
        return self.params_bytes_per_chip + self.kv_bytes_per_chip + self.activation_bytes_per_chip

    @property
    def fits(self) -> bool:
        return self.memory_per_chip_bytes <= self.layout.chip.hbm_bytes

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recomputation) over the slice's peak for the step."""
        return self.model_flops / (self.layout.num_chips * self.peak_flops * self.step_time_s)

    @property
    def mbu(self) -> float:
        """Bytes the step must read (weights once per replica, the KV cache once) over the
        slice's HBM bandwidth for the step."""
        chip = self.layout.chip
        return self.unique_bytes / (self.layout.num_chips * chip.hbm_bandwidth * self.step_time_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s

    @property
    def chip_seconds_per_token(self) -> float:
        return self.layout.num_chips * self.step_time_s / self.tokens

    @property
    def weight_bytes_per_token(self) -> float:
        """Weight bytes the slice reads from HBM in the step (each replica once: dense weights,
        the experts its tokens touch, the output head) per token of the step."""
        return self.weight_bytes_read / self.tokens


def _collective_seconds(layout: Layout, kind: str, axes, operand: float, result: float) -> float:
    p = layout.size(*axes)
    bandwidth = layout.link_bandwidth(axes)
    frac = (p - 1) / p
    if kind == "all-gather":
        return result * frac / bandwidth
    if kind == "reduce-scatter":
        return operand * frac / bandwidth
    if kind == "all-reduce":
        return 2 * operand * frac / bandwidth
    torus = layout.chip.topology.endswith("torus")
    return operand * frac * (max(1.0, p / 4) if torus else 1.0) / bandwidth  # all-to-all


class _Comms:
    """Collects the collectives of a layer, dropping those over groups of one chip."""

    def __init__(self, layout: Layout):
        self.layout, self.items = layout, []

    def add(self, kind: str, axes: tuple[str, ...], operand: float) -> None:
        axes = tuple(a for a in axes if self.layout.size(a) > 1)
        if not axes or operand <= 0:
            return
        p = self.layout.size(*axes)
        result = {"all-gather": operand * p, "reduce-scatter": operand / p}.get(kind, operand)
        seconds = _collective_seconds(self.layout, kind, axes, operand, result)
        self.items.append(Comm(kind, axes, operand, result, seconds))


@dataclasses.dataclass(frozen=True)
class _Block:
    """One layer kind's weights on a chip (elements) and its collectives."""

    used: float  # non-expert matmul weights at use (compute rules)
    used_experts: float  # routed-expert weights at use, all experts
    stored: float
    params: float
    dense_matmul: float
    expert_matmul: float
    comms: tuple[Comm, ...]
    hidden_act: float


def expert_fraction_touched(tokens: float, experts_per_token: int, num_experts: int) -> float:
    """Expected fraction of a layer's experts that ``tokens`` routed tokens touch:
    ``1 - (1 - k / E) ** tokens``.

    Assumes uniform, independent routing (each token's ``k`` experts a uniform draw; the
    load-balancing loss pushes towards it). At decode a step reads only the touched experts'
    weights, which is why small-batch MoE serving is bound by the active parameters and large
    batches by the total (DeepSpeed-MoE, Rajbhandari et al., arXiv:2201.05596 §5; Yun et al.,
    "Toward Inference-optimal Mixture-of-Expert Large Language Models", arXiv:2404.02852).
    """
    if num_experts < 1 or tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - experts_per_token / num_experts) ** tokens


def expert_fraction_read(layout: Layout, tokens: float, experts_per_token: int, num_experts):
    """Fraction of its expert weights that the busiest chip reads in a step of ``tokens``.

    Tensor-parallel experts: every chip holds a slice of every expert and reads the slices of
    the touched ones (``expert_fraction_touched``). Expert-parallel: a chip holds
    ``e = E / model`` whole experts, each touched with probability ``p``; the step waits for
    the chip with the most touched experts, ``E[max of model Binomial(e, p)]`` (independent
    experts assumed), which at small batch is far above the mean ``e p``: one token touching
    two experts makes two chips read a whole expert each.
    """
    p = expert_fraction_touched(tokens, experts_per_token, num_experts)
    if layout.experts != "expert_parallel" or num_experts < 1:
        return p
    M = layout.size("model")
    e = num_experts // M
    cdf = 0.0
    expected_max = 0.0
    for m in range(e):  # E[max] = sum_{m >= 1} P(max >= m) = sum_{m < e} 1 - F(m) ** M
        cdf += math.comb(e, m) * p**m * (1 - p) ** (e - m)
        expected_max += 1 - min(cdf, 1.0) ** M
    return expected_max / e


def expert_slots(
    tokens_per_chip: float, experts_per_token: int, shards: int, capacity_factor: float | None
) -> float:
    """Send-buffer slots per destination chip of the expert-parallel all-to-all.

    With a ``capacity_factor`` the fixed buffers of ``models.expert_parallel``:
    ``max(1, ceil(capacity_factor * t * k / n))``. Dropless (``None``): the balanced payload
    ``t * k / n`` of a ragged all-to-all under uniform routing (the fixed-buffer dropless
    worst case of ``models.expert_parallel`` moves up to ``n`` times more).
    """
    balanced = tokens_per_chip * experts_per_token / shards
    if capacity_factor is None:
        return balanced
    return max(1, math.ceil(capacity_factor * balanced - 1e-9))


def expert_parallel_comms(
    layout: Layout,
    *,
    tokens: float,
    d_model: int,
    experts_per_token: int,
    capacity_factor: float | None = None,
    act_bytes: float = 2.0,
) -> tuple[Comm, ...]:
    """The all-to-alls of one expert-parallel MoE layer on one chip (GShard, arXiv:2006.16668
    §3.2; DeepSpeed-MoE, arXiv:2201.05596 §5): ``tokens`` of the model group are split over
    ``model``; each chip sends its ``tokens / model x k`` assignments (``[model, slots,
    d_model / x]``, ``expert_slots``) to the experts' chips, with their int32 local expert
    ids, and gets the results back. Each all-to-all moves ``(n - 1) / n`` of its operand off
    the chip (``_collective_seconds``)."""
    M, X = layout.size("model"), layout.size("x")
    rows = M * expert_slots(tokens / M, experts_per_token, M, capacity_factor)
    c = _Comms(layout)
    c.add("all-to-all", ("model",), rows * d_model / X * act_bytes)  # tokens to their experts
    c.add("all-to-all", ("model",), rows * 4)  # their local expert ids
    c.add("all-to-all", ("model",), rows * d_model / X * act_bytes)  # results back
    return tuple(c.items)


def _shard_elems(shape, logical, rules, layout: Layout) -> float:
    spec = spec_for(shape, logical, rules, layout.mesh_shape)
    return math.prod(shape) / num_shards(spec, layout.mesh_shape)


def estimate(
    cfg,
    layout: Layout,
    *,
    phase: str,
    batch: int,
    context: int,
    weights_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    activation_dtype: str = "bf16",
    compute_dtype: str = "bfloat16",
) -> Estimate:
    """Predicted cost of one prefill (``context`` prompt tokens per sequence) or one decode
    step (one token per sequence against a ``context``-token cache) for ``batch`` sequences.

    Raises ``LayoutError`` when the layout's shards do not divide the model or the batch.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {list(PHASES)}")
    for name, value, table in (
        ("weights_dtype", weights_dtype, WEIGHT_BYTES),
        ("kv_dtype", kv_dtype, KV_BYTES),
        ("activation_dtype", activation_dtype, WEIGHT_BYTES),
    ):
        if value not in table:
            raise ValueError(f"unknown {name} {value!r}; valid: {list(table)}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be positive, got {batch} and {context}")
    check_divides(layout, cfg, batch)
    chip, size = layout.chip, layout.size
    peak = chip.peak(compute_dtype)
    wb, kvb, ab = WEIGHT_BYTES[weights_dtype], KV_BYTES[kv_dtype], WEIGHT_BYTES[activation_dtype]
    store, use = layout.param_rules(), layout.compute_rules()
    head = layout.attention == "head_sharded"
    E, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    X, M = size("x"), size("model")
    b = batch // size("replica", "gather")  # sequences per model group
    t = context if phase == "prefill" else 1  # new tokens per sequence
    tok = b * t
    nq = N / M  # query heads of the projections on a chip, in both attention layouts
    kp = K / M if head and K % M == 0 else K  # kv heads that do not divide are replicated
    # Attention itself: head-sharded keeps the projections' split; batch-sharded regroups
    # to b / (x model) whole sequences with every head.
    b_attn, n_l, k_l = (b, nq, kp) if head else (b // (X * M), N, K)
    n_in = 2 if cfg.mlp in ("swiglu", "geglu") else 1
    k_e, n_e = cfg.experts_per_token, max(cfg.num_experts, 1)
    Fe, Fs = cfg.expert_ffn_dim, cfg.shared_ffn_dim
    cf = cfg.capacity_factor if cfg.moe_dispatch == "capacity" else None
    rows = M * expert_slots(tok / M, k_e, M, cf)  # expert-parallel rows a chip computes

    R = cfg.rnn_width
    lru_shards = M if R % M == 0 else 1  # the RG-LRU width R is split like an FFN hidden

    def block(layer: int) -> _Block:
        kind, ssm = cfg.channel(layer), cfg.mixer(layer) == "mamba2"
        lru = cfg.mixer(layer) == "rglru"
        weights = layer_weights(cfg, layer)
        ssm_in = next((shape[1] for n, shape, _ in weights if n == "in_proj"), 0)
        mats = [(n, s, ax) for n, s, ax in weights if len(s) > 1]
        dense = [w for w in mats if not w[0].startswith("expert_")]
        routed = [w for w in mats if w[0].startswith("expert_")]
        used = sum(_shard_elems(s, ax, use, layout) for _, s, ax in dense)
        used_experts = sum(_shard_elems(s, ax, use, layout) for _, s, ax in routed)
        c = _Comms(layout)
        blocks = 1 if cfg.parallel_block or kind == "none" else 2
        for _ in range(blocks):  # each sub-block: norm of the sharded residual, then gather
            c.add("all-reduce", ("x", "model"), tok * _NORM_STAT_BYTES)
            c.add("all-gather", ("model",), tok * E / X / M * ab)
        if ssm:  # in_proj partial sums; the layer is replicated over model
            c.add("all-reduce", ("x",), tok * ssm_in * ab)
        elif lru:  # linear_y, linear_x partial sums; R split over model like an FFN hidden
            c.add("all-reduce", ("x",), 2 * tok * R / lru_shards * ab)
        else:
            c.add("all-reduce", ("x",), tok * (nq + 2 * kp) * H * ab)  # q, k, v partial sums
        if not head and not (ssm or lru):  # queries to batch shards (a local slice over x), back
            c.add("all-to-all", ("model",), tok * nq * H * ab / X)
            c.add("all-to-all", ("model",), tok * nq * H * ab / X)
            c.add("all-gather", ("x",), tok * nq * H * ab / X)
        sums = blocks  # reduce-scatters of attention out and FFN down (one in a parallel block)
        hidden = (n_in + 1) * F / M * tok if kind == "mlp" else 0
        if kind == "mlp":
            c.add("all-reduce", ("x",), n_in * tok * F / M * ab)
        elif kind == "none":
            pass
        else:
            c.add("all-reduce", ("x",), tok * n_e * 4)  # float32 router logits
            c.add("all-reduce", ("x",), n_in * tok * Fs / M * ab)  # shared expert hidden
            hidden = (n_in + 1) * (tok * k_e * Fe + tok * Fs) / M
            if layout.experts == "expert_parallel":
                c.items += expert_parallel_comms(
                    layout, tokens=tok, d_model=E, experts_per_token=k_e, capacity_factor=cf,
                    act_bytes=ab,
                )  # fmt: skip
                c.add("all-reduce", ("x",), n_in * rows * Fe * ab)
                c.add("all-to-all", ("model",), tok / M * E / X * ab)  # tokens -> residual split
                sums = 1 if cfg.parallel_block or not Fs else 2
                hidden = rows * (2 * E / X + (n_in + 1) * Fe) + (n_in + 1) * tok * Fs / M
            else:
                c.add("all-reduce", ("x",), n_in * tok * k_e * Fe / M * ab)
        if ssm:  # the mixer's output is whole on every chip: no reduce-scatter
            sums -= 0 if cfg.parallel_block and kind != "none" else 1
            hidden = max(hidden, tok * ssm_in)
        if lru:
            hidden = max(hidden, 2 * tok * R / lru_shards)
        for _ in range(sums):
            c.add("reduce-scatter", ("model",), tok * E / X * ab)
        if size("gather") > 1:
            c.add("all-gather", ("gather",), (used + used_experts) * wb / size("gather"))
        return _Block(
            used=used,
            used_experts=used_experts,
            stored=sum(_shard_elems(s, ax, store, layout) for _, s, ax in weights),
            params=sum(math.prod(s) for _, s, _ in weights),
            dense_matmul=sum(math.prod(s) for _, s, _ in dense),
            expert_matmul=sum(math.prod(s) for _, s, _ in routed),
            comms=tuple(c.items),
            hidden_act=hidden * ab,
        )

    blocks = {}
    layers = []
    kv_layer_bytes = state_bytes = ring_bytes = 0.0
    attn_flops_model = 0.0
    attention_layers = 0  # layers whose cache grows with the context
    kv_slot = K * H * 2 * kvb  # one position's keys and values, all kv heads
    kv_read = kv_written = 0.0  # the slice's cache traffic of the step, each position once
    touched = expert_fraction_read(layout, tok, k_e, cfg.num_experts)
    key = lambda i: (cfg.mixer(i), cfg.channel(i))
    for i in range(cfg.num_layers):
        if key(i) not in blocks:
            blocks[key(i)] = block(i)
        blk = blocks[key(i)]
        if cfg.mixer(i) in RECURRENT_MIXERS:
            shards = lru_shards if cfg.mixer(i) == "rglru" else 1
            per_seq = recurrent_state_bytes(cfg, i, ab) / shards
            state_bytes += b * per_seq
            attn_flops_model += recurrent_scan_flops(cfg, i, batch, t, phase)
            flops = 2 * tok * (blk.used + k_e / n_e * blk.used_experts)
            flops += recurrent_scan_flops(cfg, i, b, t, phase) / shards
            weight_bytes = (blk.used + touched * blk.used_experts) * wb
            io = 2 if phase == "decode" else 1  # decode reads and writes it; prefill writes
            layers.append(LayerCost(flops, weight_bytes + io * b * per_seq, blk.comms))
            continue
        window = cfg.window(i)
        keys = context if window is None else min(context, window)  # read by the last query
        ring = cfg.mixer(i) in RING_BUFFER_MIXERS
        # A ring buffer holds the last ``window`` positions; any other cache (Mistral-style
        # sliding windows included) holds the whole context, though only ``keys`` are read.
        slots, written = (keys, min(t, window)) if ring else (context, t)
        if phase == "prefill":  # causal: each query sees min(position, window) keys
            pairs = t * keys - keys * (keys - 1) / 2 if window else t * (t + 1) / 2
            kv_bytes = b_attn * written * k_l * H * 2 * kvb  # write the new keys and values
        else:
            pairs = keys
            kv_bytes = b_attn * keys * k_l * H * 2 * kvb  # read the cache
        attn = 4 * b_attn * pairs * n_l * H
        attn_flops_model += 4 * batch * pairs * N * H
        kv_layer_bytes += b_attn * slots * k_l * H * 2 * kvb
        kv_read += batch * keys * kv_slot
        kv_written += batch * written * kv_slot
        if ring:
            ring_bytes += b_attn * window * k_l * H * 2 * kvb
        else:
            attention_layers += 1
        flops = 2 * tok * (blk.used + k_e / n_e * blk.used_experts) + attn
        weight_bytes = (blk.used + touched * blk.used_experts) * wb
        layers.append(LayerCost(flops, weight_bytes + kv_bytes, blk.comms))
    kv_layer_bytes += state_bytes
    stored = sum(blocks[key(i)].stored for i in range(cfg.num_layers))

    # Embedding lookup (a masked gather over the vocab split, summed over ``model``) and the
    # output head for the last token of each sequence (partial sums over ``x``).
    outer = model_weights(cfg)
    stored += sum(_shard_elems(s, ax, store, layout) for _, s, ax in outer)
    head_elems = E * cfg.vocab_size / X / M
    c = _Comms(layout)
    c.add("all-reduce", ("model",), tok * E / X * ab)
    c.add("all-gather", ("model",), b * E / X / M * ab)
    c.add("all-reduce", ("x",), b * cfg.vocab_size / M * 4)
    head_cost = LayerCost(2 * b * head_elems, head_elems * wb, tuple(c.items))

    compute_s = sum(layer.flops for layer in layers) / peak
    memory_s = sum(layer.hbm_bytes for layer in layers) / chip.hbm_bandwidth
    comm_s = sum(x.seconds for layer in layers for x in layer.comms)
    step = sum(
        max(layer.flops / peak, layer.hbm_bytes / chip.hbm_bandwidth)
        + sum(x.seconds for x in layer.comms)
        for layer in (*layers, head_cost)
    )
    compute_s += head_cost.flops / peak
    memory_s += head_cost.hbm_bytes / chip.hbm_bandwidth
    comm_s += sum(x.seconds for x in head_cost.comms)

    tokens_total = batch * t
    per_layer = [blocks[key(i)] for i in range(cfg.num_layers)]
    active_matmul = sum(x.dense_matmul + k_e / n_e * x.expert_matmul for x in per_layer)
    model_flops = (
        2 * tokens_total * active_matmul + attn_flops_model + 2 * batch * E * cfg.vocab_size
    )
    recurrent = [i for i in range(cfg.num_layers) if cfg.mixer(i) in RECURRENT_MIXERS]
    state_total = batch * sum(recurrent_state_bytes(cfg, i, ab) for i in recurrent)
    # Weights each replica reads once: dense ones, the experts its tokens touch, the head.
    touched_replica = expert_fraction_touched(batch // size("replica") * t, k_e, cfg.num_experts)
    read = sum(x.dense_matmul + touched_replica * x.expert_matmul for x in per_layer)
    weight_read = size("replica") * (read + E * cfg.vocab_size) * wb
    unique = weight_read + (kv_read if phase == "decode" else kv_written)
    unique += state_total
    outer_params = sum(math.prod(s) for _, s, _ in outer)
    active = outer_params + sum(x.params - (1 - k_e / n_e) * x.expert_matmul for x in per_layer)
    # Live activations: the residual, the gathered input, the FFN hidden (MoE: the routed
    # rows) and q/k/v of the layer at work, the last-token logits, and a weight-gathered
    # layer's gathered weights.
    act = tok * (E / X / M + E / X + (nq + 2 * kp) * H) * ab
    act += max(x.hidden_act for x in per_layer)
    act += b * cfg.vocab_size / M * 4
    if size("gather") > 1:
        act += max(x.used + x.used_experts for x in per_layer) * wb
    return Estimate(
        layout=layout,
        phase=phase,
        batch=batch,
        context=context,
        step_time_s=step,
        compute_s=compute_s,
        memory_s=memory_s,
        comm_s=comm_s,
        flops_per_chip=sum(layer.flops for layer in layers) + head_cost.flops,
        hbm_bytes_per_chip=sum(layer.hbm_bytes for layer in layers) + head_cost.hbm_bytes,
        comm_bytes_per_chip=sum(layer.comm_bytes for layer in layers) + head_cost.comm_bytes,
        model_flops=model_flops,
        unique_bytes=unique,
        params_bytes_per_chip=stored * wb,
        kv_bytes_per_chip=kv_layer_bytes,
        activation_bytes_per_chip=act,
        kv_bytes_per_token_per_chip=b_attn * k_l * H * 2 * kvb * attention_layers,
        sequences_per_chip=b_attn,
        batch_shards=batch // b_attn,
        peak_flops=peak,
        layers=tuple(layers),
        total_params=outer_params + sum(x.params for x in per_layer),
        active_params=active,
        weight_bytes_read=weight_read,
        state_bytes_per_chip=state_bytes,
        window_bytes_per_chip=ring_bytes,
    )


def max_context(est: Estimate, kv_memory_fraction: float) -> int | None:
    """Longest context whose KV cache fits in ``kv_memory_fraction`` of a chip's HBM at this
    batch and layout (Pope et al. Table 1's measure).

    Recurrent layers' constant state and ring-buffer caches at their full window come off the
    budget first. ``None`` means unbounded: no layer's state grows with the context (a pure
    SSM, or recurrent and local-attention layers as in RecurrentGemma) and the state fits; 0
    if it does not fit.
    """
    budget = kv_memory_fraction * est.layout.chip.hbm_bytes
    budget -= est.state_bytes_per_chip + est.window_bytes_per_chip
    if budget < 0:
        return 0
    if est.kv_bytes_per_token_per_chip == 0:
        return None
    return int(budget // est.kv_bytes_per_token_per_chip)


def max_batch(est: Estimate, kv_memory_fraction: float) -> int:
    """Largest batch (a multiple of the batch shards) whose KV cache at this context fits in
    ``kv_memory_fraction`` of a chip's HBM."""
    budget = kv_memory_fraction * est.layout.chip.hbm_bytes
    # Growing caches, ring buffers and recurrent state: all linear in the batch.
    per_sequence = est.kv_bytes_per_chip / est.sequences_per_chip
    return int(budget // per_sequence) * est.batch_shards
