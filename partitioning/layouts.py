"""Inference layouts of Pope et al. 2022 as concrete meshes and logical-axis rules.

Pope et al., "Efficiently Scaling Transformer Inference" (arXiv:2211.05102), §3.2-3.3, lay out
a transformer over a TPU torus of ``X x Y x Z`` chips. Every layout here is a mesh with four
named axes, each a group of the slice's physical axes (so its collectives run over real links):

  ``replica``  independent copies of the model; the batch is split over them.
  ``gather``   weights are stored split over it and all-gathered before use; the batch is split
               over it (the weight-gathered layouts, §3.2.3).
  ``x``        weights are split along ``d_model`` (the 2D weight-stationary layout, §3.2.2).
  ``model``    weights are split along ``d_ff`` and heads (Megatron, 1D weight-stationary
               §3.2.1); the residual stream is split along ``d_model`` over ``x`` and ``model``.

FFN layouts (Pope's names; physical axes are taken in order, ``x`` first):

  ``1d_weight_stationary``  ``model`` = all chips.
  ``2d_weight_stationary``  ``x`` = the first (or first two) physical axes, ``model`` the rest.
  ``weight_gathered_x``     ``gather`` = the first axis, ``model`` the rest;
  ``weight_gathered_xy``    ``gather`` = the first two axes; ``weight_gathered_xyz``: all.

Attention layouts (§3.3): ``head_sharded`` splits heads (and the KV cache's kv heads, when they
divide) over ``model``; ``batch_sharded`` keeps the KV projection whole and splits the KV cache
and the attention computation by batch over every chip of a replica (``gather``, ``x`` and
``model``), with an all-to-all of the queries in and of the attention output back.

``Layout.param_rules()`` places the weights; ``Layout.compute_rules()`` is what
``partitioning.rules.activation_sharding`` pins activations (and weights at use) to.
"""

from __future__ import annotations

import dataclasses
import math

from partitioning import hardware

FFN_LAYOUTS = (
    "1d_weight_stationary",
    "2d_weight_stationary",
    "weight_gathered_x",
    "weight_gathered_xy",
    "weight_gathered_xyz",
)
ATTENTION_LAYOUTS = ("head_sharded", "batch_sharded")
EXPERT_LAYOUTS = ("expert_parallel", "tensor_parallel")
MESH_AXES = ("replica", "gather", "x", "model")


class LayoutError(ValueError):
    """A layout that cannot run a model: its shards do not divide the dimensions."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """An FFN and an attention layout on a mesh.

    Attributes:
      ffn: one of ``FFN_LAYOUTS``.
      attention: one of ``ATTENTION_LAYOUTS``.
      groups: for each of ``MESH_AXES``, the sizes of the physical axes it spans.
      chip: the hardware, for the bandwidth of each group's links.
      experts: for mixture-of-experts models, one of ``EXPERT_LAYOUTS``; ``None`` for dense.
    """

    ffn: str
    attention: str
    groups: tuple[tuple[int, ...], ...]
    chip: hardware.Chip
    experts: str | None = None

    def __post_init__(self):
        if self.ffn not in FFN_LAYOUTS:
            raise ValueError(f"unknown FFN layout {self.ffn!r}; valid: {list(FFN_LAYOUTS)}")
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(
                f"unknown attention layout {self.attention!r}; valid: {list(ATTENTION_LAYOUTS)}"
            )
        if self.experts is not None and self.experts not in EXPERT_LAYOUTS:
            raise ValueError(
                f"unknown expert layout {self.experts!r}; valid: {list(EXPERT_LAYOUTS)}"
            )

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Axis name -> size, in ``MESH_AXES`` order (size-1 axes included)."""
        return {a: math.prod(g) for a, g in zip(MESH_AXES, self.groups, strict=True)}

    @property
    def num_chips(self) -> int:
        return math.prod(self.mesh_shape.values())

    def size(self, *axes: str) -> int:
        return math.prod(self.mesh_shape[a] for a in axes)

    def param_rules(self) -> dict:
        """Where the weights live: fully split (weight-gathered layouts store them as 2D)."""
        kv = "model" if self.attention == "head_sharded" else None
        return {
            "embed": ("gather", "x"),
            "mlp": "model",
            "heads": "model",
            "kv_heads": kv,
            "vocab": "model",
            # Expert-parallel: whole experts per chip (``experts`` takes ``model`` first, so
            # an expert's ``mlp`` stays unsplit); tensor-parallel: every expert split like
            # the dense FFN.
            "experts": "model" if self.experts == "expert_parallel" else None,
        }

    def compute_rules(self) -> dict:
        """Activations, the KV cache, and weights at the point of use."""
        head = self.attention == "head_sharded"
        batch = ("replica", "gather")
        attn_batch = batch if head else (*batch, "x", "model")
        return {
            **self.param_rules(),
            "embed": "x",  # weight-gathered layouts all-gather the ``gather`` split here
            "act_batch": batch,
            "act_embed": ("x", "model"),
            "act_hidden": "x",
            "act_mlp": "model",
            "act_heads": "model",
            "act_kv_heads": "model" if head else None,
            "attn_batch": attn_batch,
            "attn_regroup_batch": batch if head else (*batch, "x"),
            "attn_heads": "model" if head else None,
            "cache_batch": attn_batch,
            "cache_heads": "model" if head else None,
        }

    def link_bandwidth(self, axes: tuple[str, ...]) -> float:
        """Bytes/s one chip moves in a collective over ``axes`` (one direction).

        TPU (Austin et al., "How To Scale Your Model", part 2 'TPU networking'): a torus axis
        of ``n`` chips is a ring when it has wraparound links (``n`` a multiple of
        ``torus_wrap``), sending both ways at ``2 x`` the per-link bandwidth, else a line at
        ``1 x``; a collective over several axes uses all of their links at once, so their
        bandwidths add. GPU: NVSwitch connects every pair, so a collective over any group
        runs at the GPU's whole NVLink bandwidth. CPU: fake devices share host memory and a
        collective is a copy at ``hbm_bandwidth / 2`` (read and write).
        """
        chip = self.chip
        if chip.topology == "nvswitch":
            return chip.ici_bandwidth
        if chip.topology == "none":
            return chip.hbm_bandwidth / 2
        bandwidth = 0.0
        for axis in axes:
            for n in self.groups[MESH_AXES.index(axis)]:
                if n > 1:
                    ring = chip.torus_wrap and n % chip.torus_wrap == 0
                    bandwidth += chip.ici_bandwidth_per_link * (2 if ring else 1)
        return bandwidth

    def describe(self) -> dict:
        """The JSON form: names and mesh axis sizes."""
        out = {"ffn": self.ffn, "attention": self.attention}
        return out if self.experts is None else {**out, "experts": self.experts}


def physical_axes(chip: hardware.Chip, topology: tuple[int, ...]) -> tuple[int, ...]:
    """The slice's axes as the layouts see them, checked against ``chip``.

    TPU topologies must have the torus's rank (3 for v4/v5p, 2 for v5e/v6e) and fit in a pod.
    A GPU slice is one NVSwitch domain of at most ``pod_size`` GPUs, written ``"8"``; any
    grouping of its GPUs has the same bandwidth, so it is factored into three near-equal axes
    to give the layouts something to name. CPU meshes take any shape.
    """
    text = "x".join(map(str, topology))
    if not topology or min(topology) < 1:
        raise ValueError(f"bad topology {text!r}: sizes must be positive")
    n = math.prod(topology)
    if chip.topology in ("3d torus", "2d torus"):
        rank = 3 if chip.topology == "3d torus" else 2
        if len(topology) != rank:
            raise ValueError(
                f"{chip.name} is a {chip.topology}: its topology has {rank} axes like "
                f"{'x'.join(['4'] * rank)}, got {text!r}"
            )
        pod = sorted(chip.pod_shape)
        if any(a > b for a, b in zip(sorted(topology), pod, strict=True)):
            raise ValueError(
                f"topology {text!r} does not fit in a {chip.name} pod "
                f"({'x'.join(map(str, chip.pod_shape))})"
            )
        return tuple(topology)
    if chip.topology == "nvswitch":
        if n > chip.pod_size:
            raise ValueError(
                f"{chip.name} slices are one NVSwitch domain of up to {chip.pod_size} GPUs; "
                f"topology {text!r} has {n}"
            )
        return _near_cube(n)
    return tuple(topology) if len(topology) > 1 else _near_cube(n)


def _near_cube(n: int) -> tuple[int, ...]:
    factors, d = [], 2
    while n > 1:
        while n % d == 0:
            factors.append(d)
            n //= d
        d += 1
    axes = [1, 1, 1]
    for f in sorted(factors, reverse=True):
        axes[axes.index(min(axes))] *= f
    return tuple(sorted(axes, reverse=True))


def enumerate_layouts(
    chip: hardware.Chip,
    topology: tuple[int, ...],
    *,
    replicas: bool = True,
    experts: tuple[str | None, ...] = (None,),
) -> list[Layout]:
    """Every distinct (replica, FFN, attention, experts) layout of the slice, in a fixed order.

    With ``replicas``, leading physical axes may hold independent model replicas (data
    parallelism across the batch); the FFN layouts then use the remaining axes. ``experts``:
    the expert layouts to combine with each (``EXPERT_LAYOUTS`` for a MoE model).
    """
    axes = physical_axes(chip, topology)
    out, seen = [], set()
    for r in range(len(axes) if replicas else 1):
        replica, rest = axes[:r], axes[r:]
        for ffn in FFN_LAYOUTS:
            for gather, x, model in _ffn_groups(ffn, rest):
                groups = (replica, gather, x, model)
                for attention in ATTENTION_LAYOUTS:
                    for expert in experts:
                        layout = Layout(ffn, attention, groups, chip, expert)
                        key = (ffn, attention, expert, tuple(layout.mesh_shape.values()))
                        if key not in seen:
                            seen.add(key)
                            out.append(layout)
    return out


def _ffn_groups(ffn: str, axes: tuple[int, ...]):
    """(gather, x, model) physical-axis groups of ``ffn`` over ``axes``."""
    prod = math.prod
    if ffn == "1d_weight_stationary":
        yield (), (), axes
    elif ffn == "2d_weight_stationary":
        for k in (1, 2):
            if k < len(axes) and prod(axes[:k]) > 1 and prod(axes[k:]) > 1:
                yield (), axes[:k], axes[k:]
    else:
        k = {"weight_gathered_x": 1, "weight_gathered_xy": 2, "weight_gathered_xyz": 3}[ffn]
        if k <= len(axes) and prod(axes[:k]) > 1:
            yield axes[:k], (), axes[k:]


def check_divides(layout: Layout, cfg, batch: int) -> None:
    """Raise ``LayoutError`` naming every dimension ``layout`` cannot split evenly."""
    s = layout.size
    head = layout.attention == "head_sharded"
    channels = {cfg.channel(i) for i in range(cfg.num_layers)}
    mixers = {cfg.mixer(i) for i in range(cfg.num_layers)}
    attention = bool(mixers - {"mamba2", "rglru"})  # mixers with heads split over model
    batch_axes = ("replica", "gather", *(() if head or not attention else ("x", "model")))
    need = [
        ("d_model", cfg.d_model, s("x", "model"), "x*model"),
        ("batch", batch, s(*batch_axes), None),
    ]
    if attention:  # a pure Mamba-2 stack has no heads to split (its layers are replicated)
        need.insert(1, ("num_heads", cfg.num_heads, s("model"), "model"))
    if "rglru" in mixers:  # the RG-LRU width and its gates' blocks are split over model
        need.append(("lru_width", cfg.rnn_width, s("model"), "model"))
        need.append(("lru_heads", cfg.rnn_heads, s("model"), "model"))
    if "mlp" in channels:
        need.insert(1, ("ffn_dim", cfg.ffn_dim, s("model"), "model"))
    if "moe" in channels:
        if layout.experts is None:
            raise LayoutError(
                f"{cfg.name} has MoE layers: its layout needs an expert layout, one of "
                f"{list(EXPERT_LAYOUTS)}"
            )
        if layout.experts == "expert_parallel":
            need.append(("num_experts", cfg.num_experts, s("model"), "model"))
        else:
            need.append(("expert_ffn_dim", cfg.expert_ffn_dim, s("model"), "model"))
        need.append(("shared_ffn_dim", cfg.shared_ffn_dim, s("model"), "model"))
    bad = [
        f"{name}={size} over {shards} shards"
        for name, size, shards, _ in need
        if shards > 1 and size % shards
    ]
    if bad:
        mesh = ", ".join(f"{a}={n}" for a, n in layout.mesh_shape.items() if n > 1)
        name = "/".join(filter(None, (layout.ffn, layout.attention, layout.experts)))
        raise LayoutError(f"layout {name} on mesh ({mesh}) does not divide " + "; ".join(bad))
