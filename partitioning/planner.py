"""The planner: every layout of a slice, costed by ``partitioning.cost``, best first.

    plans = partitioning.plan("palm-540b", "tpu-v4", "4x4x4", phase="decode", batch=64,
                              context=2048)
    best = plans[0]
    mesh = best.mesh()                           # a jax Mesh over this host's devices
    rules.shard_model(model, mesh, best.param_rules)
    with rules.activation_sharding(mesh, best.compute_rules):
        ...                                      # jit and run the model

Objectives (what each plan is evaluated at, then how plans are ranked):

  ``latency``     the requested batch over the whole slice (replicas split it); shortest step.
  ``throughput``  the largest batch whose KV cache fits the ``kv_memory_fraction`` at this
                  context (at least the requested batch); most tokens per second per chip.
  ``cost``        the requested batch on *each* replica (a smaller model group serves more
                  sequences at once); fewest chip-seconds per token.

Plans that do not fit in HBM rank after those that do; layouts whose shards do not divide the
model or the batch are skipped and listed in ``skipped``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from partitioning import cost, hardware
from partitioning.layouts import (
    ATTENTION_LAYOUTS,
    EXPERT_LAYOUTS,
    FFN_LAYOUTS,
    MESH_AXES,
    Layout,
    LayoutError,
    enumerate_layouts,
    physical_axes,
)

OBJECTIVES = ("latency", "throughput", "cost")
DEFAULT_KV_MEMORY_FRACTION = 0.3  # Pope et al. 2022 Table 1 reserves 30% of HBM for the cache


@dataclasses.dataclass(frozen=True)
class Plan:
    """A layout on a mesh, with its predicted cost (``estimate``) and capacity."""

    layout: Layout
    estimate: cost.Estimate
    max_context: int | None  # None: unbounded (no state grows with the context)
    max_batch: int

    @property
    def mesh_shape(self) -> dict[str, int]:
        return self.layout.mesh_shape

    @property
    def param_rules(self) -> dict:
        return self.layout.param_rules()

    @property
    def compute_rules(self) -> dict:
        return self.layout.compute_rules()

    def mesh(self, devices=None) -> Mesh:
        """The plan's mesh (axes ``replica, gather, x, model``) over ``devices``."""
        import jax

        devices = list(jax.devices() if devices is None else devices)
        n = self.layout.num_chips
        if len(devices) != n:
            raise ValueError(f"the plan is for {n} chips but {len(devices)} devices were given")
        physical = tuple(a for g in self.layout.groups for a in g) or (1,)
        try:
            grid = mesh_utils.create_device_mesh(physical, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.array(devices).reshape(physical)
        return Mesh(grid.reshape(tuple(self.mesh_shape.values())), MESH_AXES)

    def to_json(self) -> dict:
        e = self.estimate
        return {
            "layout": self.layout.describe(),
            "mesh": self.mesh_shape,
            "batch": e.batch,
            "step_time_s": e.step_time_s,
            "compute_s": e.compute_s,
            "memory_s": e.memory_s,
            "comm_s": e.comm_s,
            "mfu": e.mfu,
            "mbu": e.mbu,
            "memory_per_chip_bytes": e.memory_per_chip_bytes,
            "params_per_chip_bytes": e.params_bytes_per_chip,
            "kv_cache_per_chip_bytes": e.kv_bytes_per_chip,
            "fits": e.fits,
            "max_context": self.max_context,
            "max_batch": self.max_batch,
            "tokens_per_s": e.tokens_per_s,
            "chip_seconds_per_token": e.chip_seconds_per_token,
            "active_params": e.active_params,
            "total_params": e.total_params,
            "weight_bytes_per_token": e.weight_bytes_per_token,
        }


def parse_topology(topology) -> tuple[int, ...]:
    if isinstance(topology, str):
        try:
            return tuple(int(a) for a in topology.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"bad topology {topology!r}; expected sizes joined by 'x', e.g. 4x4x4, 2x4, 8"
            ) from None
    return tuple(int(a) for a in topology)


def _resolve_model(model):
    from models.configs import ModelConfig, get_config

    return model if isinstance(model, ModelConfig) else get_config(model)


def plan(
    model,
    hardware_name,
    topology,
    *,
    phase: str,
    batch: int,
    context: int,
    weights_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION,
    objective: str = "latency",
    ffn: str | None = None,
    attention: str | None = None,
    experts: str | None = None,
    replicas: bool = True,
    activation_dtype: str = "bf16",
    compute_dtype: str = "bfloat16",
    skipped: list | None = None,
) -> list[Plan]:
    """Candidate plans for serving ``model`` on a slice, best first.

    Args:
      model: a preset name (``models.list_configs()``) or a ``ModelConfig``.
      hardware_name: a ``partitioning.hardware`` name or a ``Chip``.
      topology: ``"4x4x4"`` (TPU torus), ``"8"`` (GPUs of one NVSwitch domain), or a tuple.
      phase: ``"prefill"`` (``context`` prompt tokens per sequence) or ``"decode"`` (one token
        against a ``context``-token cache).
      batch: sequences per step.
      weights_dtype, kv_dtype: storage of the weights (``bf16``/``int8``/``int4``) and cache.
      kv_memory_fraction: share of each chip's HBM for the KV cache (``max_context`` and
        ``max_batch``).
      objective: ``latency``, ``throughput`` or ``cost`` (module docstring).
      ffn, attention: keep only this FFN / attention layout; one that does not divide the
        model is an error naming the dimensions.
      experts: for a MoE model, keep only this expert layout (``expert_parallel``: experts
        split over ``model``, tokens exchanged by all-to-alls; ``tensor_parallel``: every
        expert's hidden split over ``model`` like the dense FFN); both by default.
      replicas: also consider splitting the slice into model replicas.
      skipped: if given, gets ``"layout: reason"`` for every layout that does not divide.

    Returns:
      Plans sorted by the objective, those that fit in HBM first.
    """
    cfg = _resolve_model(model)
    chip = hardware_name if isinstance(hardware_name, hardware.Chip) else None
    chip = chip or hardware.get(hardware_name)
    topology = parse_topology(topology)
    physical_axes(chip, topology)  # validates the topology against the hardware
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    if ffn is not None and ffn not in FFN_LAYOUTS:
        raise ValueError(f"unknown FFN layout {ffn!r}; valid: {list(FFN_LAYOUTS)}")
    if attention is not None and attention not in ATTENTION_LAYOUTS:
        raise ValueError(
            f"unknown attention layout {attention!r}; valid: {list(ATTENTION_LAYOUTS)}"
        )
    if experts is not None and experts not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {experts!r}; valid: {list(EXPERT_LAYOUTS)}")
    moe = any(cfg.channel(i) == "moe" for i in range(cfg.num_layers))
    expert_options = ((experts,) if experts else EXPERT_LAYOUTS) if moe else (None,)
    if not 0 < kv_memory_fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_memory_fraction}")
    opts = dict(
        weights_dtype=weights_dtype,
        kv_dtype=kv_dtype,
        activation_dtype=activation_dtype,
        compute_dtype=compute_dtype,
    )
    layouts = [
        layout
        for layout in enumerate_layouts(chip, topology, replicas=replicas, experts=expert_options)
        if (ffn is None or layout.ffn == ffn)
        and (attention is None or layout.attention == attention)
    ]
    plans, reasons = [], []
    for layout in layouts:
        b = batch * layout.size("replica") if objective == "cost" else batch
        try:
            est = cost.estimate(cfg, layout, phase=phase, batch=b, context=context, **opts)
            if objective == "throughput":
                fill = cost.max_batch(est, kv_memory_fraction)
                if fill > b:
                    est = cost.estimate(
                        cfg, layout, phase=phase, batch=fill, context=context, **opts
                    )
        except LayoutError as e:
            reasons.append(str(e))
            continue
        plans.append(
            Plan(
                layout,
                est,
                cost.max_context(est, kv_memory_fraction),
                cost.max_batch(est, kv_memory_fraction),
            )
        )
    if skipped is not None:
        skipped.extend(reasons)
    if not plans:
        raise LayoutError(
            f"no layout of {cfg.name} on {chip.name}:{'x'.join(map(str, topology))} divides "
            f"the model and batch {batch}:\n  " + "\n  ".join(reasons)
        )
    key = {
        "latency": lambda p: p.estimate.step_time_s,
        "throughput": lambda p: -p.estimate.tokens_per_s / p.layout.num_chips,
        "cost": lambda p: p.estimate.chip_seconds_per_token,
    }[objective]
    return sorted(plans, key=lambda p: (not p.estimate.fits, key(p)))


def format_plans(plans: list[Plan], *, limit: int | None = None) -> str:
    """An aligned table of plans (times in ms, memory in GB)."""
    head = (
        "#", "ffn", "attention", "mesh", "batch", "step_ms", "compute_ms", "memory_ms",
        "comm_ms", "mfu", "mbu", "GB/chip", "fits", "max_context", "max_batch",
    )  # fmt: skip
    moe = any(p.layout.experts for p in plans)
    if moe:
        head = head[:3] + ("experts",) + head[3:]
    rows = [head]
    for i, p in enumerate(plans[:limit] if limit else plans):
        e = p.estimate
        mesh = ",".join(f"{a}={n}" for a, n in p.mesh_shape.items() if n > 1) or "1"
        experts = (p.layout.experts,) if moe else ()
        rows.append(
            (
                str(i + 1), p.layout.ffn, p.layout.attention, *experts, mesh, str(e.batch),
                f"{e.step_time_s * 1e3:.3f}", f"{e.compute_s * 1e3:.3f}",
                f"{e.memory_s * 1e3:.3f}", f"{e.comm_s * 1e3:.3f}", f"{e.mfu:.3f}",
                f"{e.mbu:.3f}", f"{e.memory_per_chip_bytes / 1e9:.2f}",
                "yes" if e.fits else "no",
                "unbounded" if p.max_context is None else str(p.max_context), str(p.max_batch),
            )
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def detect_slice(devices=None) -> tuple[hardware.Chip, tuple[int, ...]]:
    """The catalog chip and the topology of ``devices`` (default: every device).

    TPU: the bounding box of the chips' ``coords``; GPU and CPU: the device count.
    """
    import jax

    devices = list(jax.devices() if devices is None else devices)
    chip = hardware.detect(devices[0])
    if devices[0].platform == "tpu" and all(hasattr(d, "coords") for d in devices):
        coords = np.array([d.coords for d in devices])
        box = tuple(int(n) for n in coords.max(0) - coords.min(0) + 1)
        rank = 3 if chip.topology == "3d torus" else 2
        if math.prod(box) == len(devices):
            return chip, box[:rank] if rank == 2 else box
    return chip, (len(devices),)


_PLAN_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "bf16"}


def auto(cfg, *, phase: str, batch: int, context: int, devices=None, chip=None, **kw) -> Plan:
    """The best plan for ``cfg`` on ``devices`` (``--plan auto`` in ``experiments``).

    Weights, KV cache and activations are costed in the config's own dtypes; ``chip``
    overrides the detected hardware (e.g. a measured CPU).
    """
    detected, topology = detect_slice(devices)
    chip = chip or detected
    compute = cfg.dtype if cfg.dtype in chip.peak_flops else next(iter(chip.peak_flops))
    opts = dict(
        weights_dtype=_PLAN_DTYPES[cfg.param_dtype],
        kv_dtype=_PLAN_DTYPES[cfg.dtype],
        activation_dtype=_PLAN_DTYPES[cfg.dtype],
        compute_dtype=compute,
    )
    return plan(cfg, chip, topology, phase=phase, batch=batch, context=context, **opts, **kw)[0]


@contextlib.contextmanager
def use(plan_: Plan, model, devices=None) -> Iterator[Mesh]:
    """Lay ``model``'s weights out by ``plan_`` (in place) and pin activations to it within
    the context; yields the mesh."""
    from partitioning import rules

    mesh = plan_.mesh(devices)
    rules.shard_model(model, mesh, plan_.param_rules)
    with rules.activation_sharding(mesh, plan_.compute_rules):
        yield mesh


def summary(plan_: Plan) -> str:
    """One line: layout, mesh and predicted step."""
    e = plan_.estimate
    mesh = ", ".join(f"{a}={n}" for a, n in plan_.mesh_shape.items() if n > 1) or "one device"
    name = " / ".join(
        filter(None, (plan_.layout.ffn, plan_.layout.attention, plan_.layout.experts))
    )
    return (
        f"plan: {name} on ({mesh}); predicted "
        f"{e.phase} step {e.step_time_s * 1e3:.3f} ms, MFU {e.mfu:.2f}, MBU {e.mbu:.2f}"
    )
