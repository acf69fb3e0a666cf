"""The collectives of a compiled XLA program, with bytes per device and the mesh axes they span.

What the cost model (``partitioning.cost``) predicts is checked against what XLA compiles: this
module reads the post-optimization HLO text of ``jax.jit(f).lower(*args).compile()`` and lists
every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute in it.

    compiled = jax.jit(f).lower(x, w).compile()
    for c in hlo.summarize(hlo.collectives(compiled, mesh)):
        print(c.count, c.kind, c.axes, c.dtype, c.operand_bytes, c.result_bytes)

Conventions:

- Bytes are per device: the operand(s) and result(s) of the op in the SPMD-partitioned program
  (tuple-shaped ops, e.g. combined all-reduces or XLA CPU's tuple all-to-all, sum their parts).
- Async pairs (``all-gather-start``/``-done``, ``all-reduce-start``/``-done``,
  ``collective-permute-start``/``-done``) count once, at the start, with the shape of the
  ``-done`` (the real result, not the start's bookkeeping tuple). Ops wrapped in generic
  ``async-start`` computations are found inside the wrapped computation.
- Every computation is scanned, so ops in ``while`` bodies and called computations appear once
  each: loop trip counts are **not** multiplied in.
- Replica groups are read in every printed form: explicit ``{{0,1},{2,3}}``, empty ``{}`` (all
  devices), the iota list ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)`` (``arange`` of the bracketed
  dims, transposed by ``T``, reshaped to ``[groups, group size]``), and the mesh-axes form
  ``mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}`` that recent XLA prints
  (groups span the named axes, or sub-axes ``'a':(pre)size``, of that XLA mesh; this is
  ``MeshAxesReplicaGroupList`` in ``xla/hlo/ir/replica_group.cc``).
- The numbers in groups are logical ids: with ``use_global_device_ids=true`` (and in
  cross-partition mode when there is one replica) id ``i`` is the device at flat position ``i``
  of ``mesh.devices``, not ``Device.id``. ``tests/partitioning/test_hlo.py`` checks this on a
  mesh whose devices are permuted.
- ``axes`` are the mesh axes whose coordinates vary within every group while the others stay
  fixed, in mesh order; ``()`` when there is no mesh, a group has one device, or a group is not
  a full product of mesh axes (e.g. half of an axis).
- ``collective-permute`` has source-target pairs, not groups: its ``group_size`` is the size of
  the largest connected component of the pair graph and its ``axes`` are those along which some
  pair moves data, so a ring shift along an axis of size ``n`` has ``group_size = n`` and that
  axis as ``axes``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op (or ``count`` identical ones) of a compiled SPMD program.

    Attributes:
      kind: one of ``KINDS``.
      dtype: element type of the result (``"f32"``, ``"bf16"``); a tuple result of several
        types joins them with ``+`` in order of appearance.
      operand_bytes: bytes of the operand(s) on one device.
      result_bytes: bytes of the result(s) on one device.
      group_size: devices per replica group (collective-permute: in the largest connected
        component of its source-target pairs).
      axes: mesh axis names the groups span, in mesh order; ``()`` if they map to none
        (collective-permute: the axes along which some source-target pair differs).
      count: number of identical ops merged by ``summarize``.
    """

    kind: str
    dtype: str
    operand_bytes: int
    result_bytes: int
    group_size: int
    axes: tuple[str, ...]
    count: int = 1


def collectives(compiled_or_text, mesh=None) -> list[Collective]:
    """The collectives of a compiled program, in HLO text order.

    Args:
      compiled_or_text: a ``jax.stages.Compiled`` or its ``.as_text()`` string.
      mesh: the ``jax.sharding.Mesh`` the program was partitioned over; without it every
        ``axes`` is ``()``.

    Returns:
      One ``Collective`` per op (``count=1``).
    """
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    instrs = [i for i in map(_parse_instruction, text.splitlines()) if i is not None]
    shapes = {i.name: i.shape for i in instrs}
    done_shape = {}
    for i in instrs:
        if i.opcode.endswith("-done") and i.opcode[: -len("-done")] in KINDS and i.operands:
            done_shape[_operand_name(i.operands[0])] = i.shape
    num_devices = mesh.devices.size if mesh is not None else _num_devices(text)

    out = []
    for i in instrs:
        kind = i.opcode.removesuffix("-start")
        if kind not in KINDS:
            continue
        if i.opcode.endswith("-start"):
            shape = done_shape.get(i.name) or _async_result(kind, i.shape)
        else:
            shape = i.shape
        arrays = _arrays(shape)
        operand_bytes = sum(_bytes(_operand_shape(o, shapes)) for o in i.operands)
        if kind == "collective-permute":
            pairs = _int_lists(_attr_braces(i.attrs, "source_target_pairs"))
            groups = _components(pairs)
            axes = _moved_axes(pairs, mesh) if mesh is not None else ()
        else:
            groups = replica_groups(i.attrs, num_devices)
            axes = mesh_axes(groups, mesh) if mesh is not None else ()
        dtypes = list(dict.fromkeys(dtype for dtype, _ in arrays))
        out.append(
            Collective(
                kind=kind,
                dtype="+".join(dtypes),
                operand_bytes=operand_bytes,
                result_bytes=_bytes(shape),
                group_size=max((len(g) for g in groups), default=1),
                axes=axes,
            )
        )
    return out


def summarize(cols) -> list[Collective]:
    """Merges collectives equal in everything but ``count`` (counts add), sorted by kind, axes,
    dtype and bytes."""
    counts = collections.Counter()
    for c in cols:
        counts[dataclasses.replace(c, count=1)] += c.count
    merged = [dataclasses.replace(c, count=n) for c, n in counts.items()]
    return sorted(
        merged,
        key=lambda c: (c.kind, c.axes, c.dtype, c.operand_bytes, c.result_bytes, c.group_size),
    )


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The replica groups of one instruction, as lists of logical device ids.

    Args:
      attrs: the instruction's attribute text (anything containing ``replica_groups=...``).
      num_devices: devices of the program, for the empty form ``{}`` (one group of all).

    Returns:
      The groups; ``[list(range(num_devices))]`` when the attribute is empty or absent.
    """
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = _ints(m.group(1))
        return _iota(_ints(m.group(2)), m.group(3)).reshape(shape).tolist()
    m = re.search(
        r"replica_groups=mesh\[([^\]]*)\]"
        r"(?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}",
        attrs,
    )
    if m:
        return _mesh_axes_groups(m.group(1), m.group(2), m.group(3))
    groups = _int_lists(_attr_braces(attrs, "replica_groups"))
    return groups if groups else [list(range(num_devices))]


def mesh_axes(groups: list[list[int]], mesh) -> tuple[str, ...]:
    """The mesh axes that every group spans exactly (mesh order), or ``()`` if none do.

    A group spans axes ``A`` when its devices' mesh coordinates vary along ``A`` only and it
    holds all ``prod(mesh.shape[a] for a in A)`` devices of that slice of the mesh.
    """
    shape, names = mesh.devices.shape, tuple(mesh.axis_names)
    spanned = None
    for group in groups:
        if not group or max(group) >= mesh.devices.size:
            return ()
        coords = np.unravel_index(np.asarray(group), shape)
        axes = tuple(n for n, c in zip(names, coords, strict=True) if len(set(c.tolist())) > 1)
        if spanned is not None and axes != spanned:
            return ()
        if len(set(group)) != math.prod(mesh.shape[a] for a in axes):
            return ()
        spanned = axes
    return spanned or ()


def _moved_axes(pairs: list[list[int]], mesh) -> tuple[str, ...]:
    """Mesh axes along which some ``[source, target]`` pair differs (mesh order)."""
    ids = np.asarray(pairs, dtype=int).reshape(-1, 2)
    if ids.size and ids.max() >= mesh.devices.size:
        return ()
    src, dst = (np.unravel_index(ids[:, j], mesh.devices.shape) for j in (0, 1))
    names = mesh.axis_names
    return tuple(n for n, s, d in zip(names, src, dst, strict=True) if np.any(s != d))


# --- HLO text ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str


_COMMENT = re.compile(r"/\*.*?\*/")  # printers mark long tuples with /*index=5*/
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*(?P<opcode>[a-z][\w\-]*)\(")


def _parse_instruction(line: str) -> _Instruction | None:
    """``%name = SHAPE opcode(operands), attrs`` -> its parts; None for other lines."""
    line = _COMMENT.sub("", line)
    head = _HEAD.match(line)
    if not head:
        return None
    rest = line[head.end() :]
    if rest.startswith("("):
        end = _matching(rest, 0)
        if end < 0:
            return None
        shape, rest = rest[: end + 1], rest[end + 1 :]
    else:
        shape, _, rest = rest.partition(" ")
    op = _OPCODE.match(rest)
    if not op:
        return None
    start = op.end() - 1
    end = _matching(rest, start)
    if end < 0:
        return None
    operands = tuple(o.strip() for o in _split_top(rest[start + 1 : end]) if o.strip())
    return _Instruction(head["name"], shape, op["opcode"], operands, rest[end + 1 :])


def _matching(s: str, start: int) -> int:
    """Index of the bracket closing the one at ``s[start]`` (any of ``({[``), or -1."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "({[":
            depth += 1
        elif s[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top(s: str) -> list[str]:
    """Splits ``s`` at commas outside any brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _operand_name(operand: str) -> str:
    """``%x`` or (older printers) ``f32[4]{0} %x`` -> ``x``."""
    return operand.split()[-1].lstrip("%")


def _operand_shape(operand: str, shapes: dict[str, str]) -> str:
    inline = operand.rsplit(None, 1)
    if len(inline) == 2:
        return inline[0]
    return shapes.get(_operand_name(operand), "")


def _async_result(kind: str, shape: str) -> str:
    """The result inside an async start's tuple when no ``-done`` names it: all-gather-start
    is ``(operands, results)``, collective-permute-start ``(operand, result, contexts...)``,
    all-reduce-start is already the result."""
    if kind == "all-reduce" or not shape.startswith("("):
        return shape
    parts = _split_top(shape[1:-1])
    return parts[1].strip() if len(parts) > 1 else shape


def _attr_braces(attrs: str, key: str) -> str:
    """The ``{...}`` value of ``key=`` in ``attrs`` (``""`` if absent)."""
    i = attrs.find(key + "={")
    if i < 0:
        return ""
    start = i + len(key) + 1
    return attrs[start : _matching(attrs, start) + 1]


def _int_lists(braces: str) -> list[list[int]]:
    """``{{0,1},{2,3}}`` -> ``[[0, 1], [2, 3]]``."""
    return [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", braces[1:-1])]


def _ints(s: str) -> list[int]:
    return [int(t) for t in re.findall(r"\d+", s)]


def _num_devices(text: str) -> int:
    parts = re.search(r"num_partitions=(\d+)", text)
    replicas = re.search(r"replica_count=(\d+)", text)
    return (int(parts.group(1)) if parts else 1) * (int(replicas.group(1)) if replicas else 1)


# --- shapes --------------------------------------------------------------------------------

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    """``(f32[2,3]{1,0}, bf16[4])`` -> ``[("f32", [2, 3]), ("bf16", [4])]``."""
    return [(dtype, _ints(dims)) for dtype, dims in _ARRAY.findall(shape)]


def _bits(dtype: str) -> int:
    """Bits per element from the HLO type name: the first number in it (``bf16``, ``f8e4m3fn``,
    ``c64``, ``s4``); ``pred`` is a byte, ``token`` nothing."""
    if dtype == "pred":
        return 8
    m = re.search(r"\d+", dtype)
    return int(m.group()) if m else 0


def _bytes(shape: str) -> int:
    return sum(math.ceil(math.prod(dims) * _bits(dtype) / 8) for dtype, dims in _arrays(shape))


# --- replica groups ------------------------------------------------------------------------


def _iota(reshape_dims: list[int], perm: str | None) -> np.ndarray:
    """Flat ids of ``arange(prod(dims)).reshape(dims).transpose(perm)``."""
    ids = np.arange(math.prod(reshape_dims)).reshape(reshape_dims)
    if perm:
        ids = ids.transpose(_ints(perm))
    return ids.reshape(-1)


def _mesh_axes_groups(mesh_text: str, device_ids: str | None, group_axes: str) -> list:
    """Groups of the mesh-axes form: the devices of an XLA mesh that differ only along the
    named (sub-)axes, whose coordinates are the fastest-varying within a group."""
    axes = re.findall(r"'?([^',=\s]+)'?=(\d+)", mesh_text)
    names = [n for n, _ in axes]
    sizes = [int(s) for _, s in axes]
    n = math.prod(sizes)
    if not device_ids:
        ids = np.arange(n)
    else:
        iota = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", device_ids)
        ids = _iota(_ints(iota.group(1)), iota.group(2)) if iota else np.array(_ints(device_ids))

    # Split every mesh axis into factors so each referenced (sub-)axis is one dimension:
    # 'a':(pre)size of an axis of size S splits it into [pre, size, S / (pre * size)].
    refs = []
    for ref in re.findall(r"'?([^',:{}\s]+)'?(?::\((\d+)\)(\d+))?", group_axes):
        axis = names.index(ref[0])
        pre, size = (int(ref[1]), int(ref[2])) if ref[1] else (1, sizes[axis])
        refs.append((axis, pre, size))
    factors, grouped = [], {}
    for axis, full in enumerate(sizes):
        done = 1
        for ref in sorted((r for r in refs if r[0] == axis), key=lambda r: r[1]):
            if ref[1] != done:
                factors.append(ref[1] // done)
                done = ref[1]
            grouped[ref] = len(factors)
            factors.append(ref[2])
            done *= ref[2]
        if done != full:
            factors.append(full // done)
    inner = [grouped[r] for r in refs]
    outer = [d for d in range(len(factors)) if d not in inner]
    size = math.prod(r[2] for r in refs)
    return ids.reshape(factors).transpose(outer + inner).reshape(-1, size).tolist()


def _components(pairs: list[list[int]]) -> list[list[int]]:
    """Connected components of the graph whose edges are ``pairs`` (sorted ids each)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for pair in pairs:
        parent[root(pair[0])] = root(pair[-1])
    members = collections.defaultdict(list)
    for i in parent:
        members[root(i)].append(i)
    return sorted(sorted(m) for m in members.values())
