"""Logical-axis rules: which mesh axes shard each logical dimension the models name.

Models name logical axes only (``models.layers.param``); this module is the one place that
maps them to mesh axes. Rules are data: a named preset (a dict) plus overrides. A logical
axis maps to a mesh axis, a tuple of mesh axes, or ``None`` (replicated).

Presets (Megatron-style tensor parallelism, Shoeybi et al. 2019; the 1D weight-stationary
layout of Pope et al. 2022 §3.2 is ``tensor_parallel`` with the ``model`` axis spanning the
slice):

  ``data_parallel``    every weight on every device; the batch split over ``data``.
  ``fsdp``             weights split over ``data`` along ``embed``, batch over ``data``.
  ``tensor_parallel``  heads, kv heads, ffn and vocab over ``model``; batch over ``data``.
  ``fsdp_tp``          ``tensor_parallel`` plus ``embed`` over ``data``.

A dimension is sharded only when its size divides by the mesh axes' product; otherwise it is
replicated (e.g. 2 kv heads on a 4-way ``model`` axis), and ``sharding_report`` shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXES = (
    # Activations: batch and sequence; the residual stream's feature dimension (``act_embed``)
    # and the same features as they enter a projection (``act_hidden``); the FFN hidden
    # (``act_mlp``); query and kv heads after the projections.
    "act_batch",
    "act_seq",
    "act_embed",
    "act_hidden",
    "act_mlp",
    "act_heads",
    "act_kv_heads",
    # Inside attention (batch-sharded attention regroups queries by batch, through an
    # intermediate layout so that XLA moves them with one all-to-all) and the KV cache.
    "attn_batch",
    "attn_heads",
    "attn_regroup_batch",
    "cache_batch",
    "cache_seq",
    "cache_heads",
    # Weights.
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "norm",
    "layers",
    "experts",
)

RULES: dict[str, dict[str, MeshAxes]] = {
    "data_parallel": {"act_batch": "data"},
    "fsdp": {"act_batch": "data", "embed": "data"},
    "tensor_parallel": {
        "act_batch": "data",
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "vocab": "model",
        "experts": "model",
    },
    "fsdp_tp": {
        "act_batch": "data",
        "embed": "data",
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "vocab": "model",
        "experts": "model",
    },
}


def get_rules(name: str, **overrides: MeshAxes) -> dict[str, MeshAxes]:
    """Preset ``name`` with ``overrides``; unknown presets or logical axes are errors."""
    if name not in RULES:
        raise ValueError(f"unknown rules preset {name!r}; valid: {sorted(RULES)}")
    unknown = sorted(set(overrides) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; valid: {list(LOGICAL_AXES)}")
    return {**RULES[name], **overrides}


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def spec_for(
    shape, logical: tuple[str | None, ...], rules: dict, mesh: Mesh | Mapping[str, int]
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are named ``logical``.

    Mesh axes absent from ``mesh`` or of size 1 are dropped; a mesh axis is used at most once
    (first dimension wins); a dimension that does not divide evenly is replicated. ``mesh``
    may be a ``Mesh`` or just its axis sizes (the cost model plans meshes it never builds).
    """
    unknown = [a for a in logical if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; valid: {list(LOGICAL_AXES)}")
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    used: set[str] = set()
    out = []
    for size, name in zip(shape, logical, strict=True):
        axes = [a for a in _as_tuple(rules.get(name)) if sizes.get(a, 1) > 1 and a not in used]
        if axes and size % math.prod(sizes[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else tuple(axes))
        else:
            out.append(None)
    return PartitionSpec(*out)


def num_shards(spec: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> int:
    """How many pieces ``spec`` cuts an array into on ``mesh``."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return math.prod(sizes[a] for axes in spec for a in _as_tuple(axes))


def _params(model):
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            yield ".".join(str(p) for p in path), var


def _put(value, sharding: NamedSharding):
    if sharding.is_fully_addressable or not getattr(value, "is_fully_addressable", True):
        return jax.device_put(value, sharding)  # one process, or a reshard of a global array
    # Several processes, each with the same full value (same seed or checkpoint): each builds
    # only its own shards; ``device_put`` would first all-gather every weight to every process
    # to check that they agree.
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model, mesh: Mesh, rules: dict) -> None:
    """Place every parameter of ``model`` on ``mesh`` by its logical axes (in place).

    With several processes, every process holds identical parameters (same seed or
    checkpoint) and calls this with the same global ``mesh``.
    """
    for _, var in _params(model):
        value = var[...]
        spec = spec_for(value.shape, var.get_metadata()["out_sharding"], rules, mesh)
        # A whole-value replace: ``var[...] = x`` would scatter into the old (committed) array.
        var.set_value(_put(value, NamedSharding(mesh, spec)))


def constrain(x, logical: tuple[str | None, ...], rules: dict, mesh: Mesh):
    """``with_sharding_constraint`` of an activation named by logical axes."""
    spec = spec_for(x.shape, logical, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict) -> Iterator[None]:
    """Within this context, models pin their activations (and weights at the point of use) to
    ``rules`` on ``mesh`` through ``shard_as``.

    Read when a function is traced: jit a function inside the context (``models.generate``
    keys its compiled programs on the active context). Outside any context ``shard_as`` is the
    identity and XLA propagates shardings from the parameters and inputs.
    """
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, dict(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active_sharding() -> tuple[Mesh, dict] | None:
    """The ``(mesh, rules)`` of the innermost ``activation_sharding`` context, or ``None``."""
    return getattr(_ACTIVE, "value", None)


def shard_as(x, logical: tuple[str | None, ...]):
    """Constrain ``x`` (dimensions named ``logical``) by the active rules; identity outside."""
    active = active_sharding()
    if active is None:
        return x
    mesh, rules = active
    return constrain(x, logical, rules, mesh)


@dataclasses.dataclass(frozen=True)
class ReportRow:
    path: str
    shape: tuple[int, ...]
    logical: tuple[str | None, ...]
    spec: PartitionSpec
    bytes_per_device: int


def sharding_report(model, mesh: Mesh, rules: dict) -> list[ReportRow]:
    """Per parameter: path, shape, logical axes, PartitionSpec and bytes held per device."""
    rows = []
    for path, var in _params(model):
        value = var[...]
        logical = tuple(var.get_metadata()["out_sharding"])
        spec = spec_for(value.shape, logical, rules, mesh)
        nbytes = math.prod(value.shape) * value.dtype.itemsize // num_shards(spec, mesh)
        rows.append(ReportRow(path, tuple(value.shape), logical, spec, nbytes))
    return rows


def format_report(rows: list[ReportRow]) -> str:
    """The report as an aligned table with a total line."""
    table = [("parameter", "shape", "logical axes", "spec", "bytes/device")]
    for r in rows:
        axes = ",".join(a or "-" for a in r.logical)
        table.append(
            (
                r.path,
                "x".join(map(str, r.shape)),
                axes,
                str(tuple(r.spec)),
                f"{r.bytes_per_device:,}",
            )
        )
    table.append(("total", "", "", "", f"{sum(r.bytes_per_device for r in rows):,}"))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
