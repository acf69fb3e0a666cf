"""Device meshes from slice descriptions, with ICI and DCN axis sizes.

A slice is written ``CHIP:TOPOLOGY[*SLICES]``: ``tpu-v4:4x4x4`` (64 chips in one ICI domain),
``tpu-v5e:2x4``, ``h100:8`` (one NVLink domain), ``cpu:8``, ``tpu-v5e:16x16*4`` (four slices
joined by the data-center network). Mesh axes have an ICI size (within a slice) and a DCN
size (across slices); one ICI size may be ``-1`` to take the remaining devices.

    spec = parse_slice("tpu-v5e:4x4*2")
    mesh = make_mesh({"data": -1, "model": 4}, dcn={"data": 2})   # data = 2 (ICI) x 2 (DCN)
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from partitioning import hardware


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """``chip`` (a ``hardware`` name), ICI ``topology`` of one slice, and ``num_slices``."""

    chip: str
    topology: tuple[int, ...]
    num_slices: int = 1

    @property
    def devices_per_slice(self) -> int:
        return math.prod(self.topology)

    @property
    def num_devices(self) -> int:
        return self.devices_per_slice * self.num_slices


_SLICE = re.compile(r"^([a-z0-9-]+):(\d+(?:x\d+)*)(?:\*(\d+))?$")


def parse_slice(text: str) -> SliceSpec:
    """Parse ``CHIP:AxBxC[*SLICES]``; errors name the text and the valid chips."""
    m = _SLICE.match(text.strip().lower())
    if not m:
        raise ValueError(
            f"bad slice {text!r}; expected CHIP:TOPOLOGY[*SLICES], e.g. tpu-v4:4x4x4, h100:8, "
            "tpu-v5e:16x16*2"
        )
    chip = hardware.get(m.group(1)).name
    topology = tuple(int(d) for d in m.group(2).split("x"))
    slices = int(m.group(3) or 1)
    if min(topology) < 1 or slices < 1:
        raise ValueError(f"bad slice {text!r}: sizes must be positive")
    return SliceSpec(chip, topology, slices)


def _resolve(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one {what} axis may be -1, got {fill}")
    known = math.prod(n for n in sizes.values() if n != -1)
    if any(n < 1 and n != -1 for n in sizes.values()) or total % known:
        raise ValueError(f"{what} axis sizes {sizes} do not divide {total} devices")
    out = dict(sizes)
    if fill:
        out[fill[0]] = total // known
    if math.prod(out.values()) != total:
        raise ValueError(
            f"{what} axis sizes {out} use {math.prod(out.values())} of {total} devices"
        )
    return out


def make_mesh(ici: dict[str, int], dcn: dict[str, int] | None = None, *, devices=None) -> Mesh:
    """A mesh whose axis ``a`` has size ``dcn[a] * ici[a]`` (DCN-major within the axis).

    Args:
      ici: axis name -> size within one slice (one may be -1: the rest of the slice).
      dcn: axis name -> number of slices it spans (default 1 for every axis).
      devices: default ``jax.devices()``; split into ``prod(dcn)`` equal slices in order
        (by ``slice_index`` on multi-slice TPUs).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: 1 for a in ici} | dict(dcn or {})
    unknown = sorted(set(dcn) - set(ici))
    if unknown:
        raise ValueError(f"DCN axes {unknown} are not mesh axes {list(ici)}")
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices do not split into {num_slices} slices")
    ici = _resolve(ici, len(devices) // num_slices, "ICI")
    names = tuple(ici)
    if num_slices == 1:
        grid = mesh_utils.create_device_mesh(tuple(ici.values()), devices)
    elif len({getattr(d, "slice_index", None) for d in devices}) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            tuple(ici.values()), tuple(dcn[a] for a in names), devices
        )
    else:
        # Devices without slice metadata (CPU, or GPU hosts and CPU processes that all report
        # slice_index 0): consecutive groups, e.g. one per process, form the slices; each axis
        # is (dcn, ici) with the slice index major.
        shape = [dcn[a] for a in names] + [ici[a] for a in names]
        grid = np.array(devices).reshape(shape)
        order = [
            i
            for pair in zip(range(len(names)), range(len(names), 2 * len(names)), strict=True)
            for i in pair
        ]
        grid = grid.transpose(order).reshape([dcn[a] * ici[a] for a in names])
    return Mesh(grid, names)


def mesh_for_slice(
    slice_spec: SliceSpec | str,
    ici: dict[str, int],
    dcn: dict[str, int] | None = None,
    *,
    devices=None,
) -> Mesh:
    """``make_mesh`` after checking the devices match the slice description."""
    spec = parse_slice(slice_spec) if isinstance(slice_spec, str) else slice_spec
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != spec.num_devices:
        raise ValueError(
            f"slice {spec.chip}:{'x'.join(map(str, spec.topology))}*{spec.num_slices} has "
            f"{spec.num_devices} devices but {len(devices)} are available"
        )
    dcn = dcn or ({next(iter(ici)): spec.num_slices} if spec.num_slices > 1 else None)
    return make_mesh(ici, dcn, devices=devices)
