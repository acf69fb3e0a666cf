"""Analytical cost of one inference step of a dense transformer under a layout.

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


def layer_weights(cfg) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, logical axes) of one layer's weights, as ``models`` builds them."""
    E, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    out = [
        ("q", (E, N, H), ("embed", "heads", "head_dim")),
        ("k", (E, K, H), ("embed", "kv_heads", "head_dim")),
        ("v", (E, K, H), ("embed", "kv_heads", "head_dim")),
        ("o", (N, H, E), ("heads", "head_dim", "embed")),
        ("up", (E, F), ("embed", "mlp")),
        ("down", (F, E), ("mlp", "embed")),
        ("mixer_norm", (E,), ("norm",)),
    ]
    if cfg.mlp in ("swiglu", "geglu"):
        out.append(("gate", (E, F), ("embed", "mlp")))
    if not cfg.parallel_block:
        out.append(("channel_norm", (E,), ("norm",)))
    if cfg.qkv_bias:
        out += [
            ("q_bias", (N, H), ("heads", "head_dim")),
            ("k_bias", (K, H), ("kv_heads", "head_dim")),
            ("v_bias", (K, H), ("kv_heads", "head_dim")),
        ]
    if cfg.out_bias:
        out.append(("o_bias", (E,), ("embed",)))
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

    weights = layer_weights(cfg)
    used = sum(_shard_elems(s, ax, use, layout) for _, s, ax in weights if len(s) > 1)
    stored = sum(_shard_elems(s, ax, store, layout) for _, s, ax in weights)
    matmul_params = sum(math.prod(s) for _, s, _ in weights if len(s) > 1)

    def comms() -> tuple[Comm, ...]:
        c = _Comms(layout)
        blocks = 1 if cfg.parallel_block else 2
        for _ in range(blocks):  # each sub-block: norm of the sharded residual, then gather
            c.add("all-reduce", ("x", "model"), tok * _NORM_STAT_BYTES)
            c.add("all-gather", ("model",), tok * E / X / M * ab)
        c.add("all-reduce", ("x",), tok * (nq + 2 * kp) * H * ab)  # q, k, v partial sums
        if not head:  # queries to batch shards (a local slice over x first) and back
            c.add("all-to-all", ("model",), tok * nq * H * ab / X)
            c.add("all-to-all", ("model",), tok * nq * H * ab / X)
            c.add("all-gather", ("x",), tok * nq * H * ab / X)
        c.add("all-reduce", ("x",), n_in * tok * F / M * ab)
        for _ in range(blocks):  # attention out and FFN down (one sum in a parallel block)
            c.add("reduce-scatter", ("model",), tok * E / X * ab)
        if size("gather") > 1:
            c.add("all-gather", ("gather",), used * wb / size("gather"))
        return tuple(c.items)

    layer_comms = comms()
    layers = []
    kv_layer_bytes = 0.0
    attn_flops_model = 0.0
    for i in range(cfg.num_layers):
        window = cfg.window(i)
        keys = context if window is None else min(context, window)
        if phase == "prefill":  # causal: each query sees min(position, window) keys
            pairs = t * keys - keys * (keys - 1) / 2 if window else t * (t + 1) / 2
            kv_bytes = b_attn * t * k_l * H * 2 * kvb  # write the new keys and values
        else:
            pairs = keys
            kv_bytes = b_attn * keys * k_l * H * 2 * kvb  # read the cache
        attn = 4 * b_attn * pairs * n_l * H
        attn_flops_model += 4 * batch * pairs * N * H
        kv_layer_bytes += b_attn * context * k_l * H * 2 * kvb
        layers.append(LayerCost(2 * tok * used + attn, used * wb + kv_bytes, layer_comms))

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
    model_flops = (
        2 * tokens_total * matmul_params * cfg.num_layers
        + attn_flops_model
        + 2 * batch * E * cfg.vocab_size
    )
    kv_total = batch * context * K * H * 2 * kvb * cfg.num_layers
    unique = size("replica") * (matmul_params * cfg.num_layers + E * cfg.vocab_size) * wb
    unique += kv_total if phase == "decode" else kv_total * t / context
    # Live activations: the residual, the gathered input, the FFN hidden and q/k/v of the
    # layer at work, the last-token logits, and a weight-gathered layer's gathered weights.
    act = tok * (E / X / M + E / X + (n_in + 1) * F / M + (nq + 2 * kp) * H) * ab
    act += b * cfg.vocab_size / M * 4
    if size("gather") > 1:
        act += used * wb
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
        kv_bytes_per_token_per_chip=b_attn * k_l * H * 2 * kvb * cfg.num_layers,
        sequences_per_chip=b_attn,
        batch_shards=batch // b_attn,
        peak_flops=peak,
        layers=tuple(layers),
    )


def max_context(est: Estimate, kv_memory_fraction: float) -> int:
    """Longest context whose KV cache fits in ``kv_memory_fraction`` of a chip's HBM at this
    batch and layout (Pope et al. Table 1's measure)."""
    budget = kv_memory_fraction * est.layout.chip.hbm_bytes
    return int(budget // est.kv_bytes_per_token_per_chip)


def max_batch(est: Estimate, kv_memory_fraction: float) -> int:
    """Largest batch (a multiple of the batch shards) whose KV cache at this context fits in
    ``kv_memory_fraction`` of a chip's HBM."""
    budget = kv_memory_fraction * est.layout.chip.hbm_bytes
    per_sequence = est.kv_bytes_per_token_per_chip / est.sequences_per_chip * est.context
    return int(budget // per_sequence) * est.batch_shards
