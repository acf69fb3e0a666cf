"""A small reader/writer for the safetensors format, numpy only (no torch, no ``safetensors``).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
length ``n``, ``n`` bytes of UTF-8 JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the byte after the header) plus an
optional ``"__metadata__"`` dict of strings, then the raw little-endian, row-major data.

Tensors are read as zero-copy views of a read-only memory map. A checkpoint directory holds
either one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {tensor name: shard file}}``); ``Checkpoint`` reads both.

    tensors = load_file("model.safetensors")          # dict of read-only numpy arrays
    save_file({"w": np.ones((2, 3), np.float32)}, "out.safetensors", {"format": "pt"})
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype code -> little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit of the reference implementation


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (truncated, malformed header, unknown dtype)."""


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file or directory that does not exist."""

    def __str__(self) -> str:  # one line, without errno decoration
        return str(self.args[0]) if self.args else super().__str__()


def dtype_code(dtype) -> str:
    """The safetensors code (``"F32"``, ``"BF16"``, ...) of a numpy/jax dtype."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt not in _CODES:
        raise SafetensorsError(f"dtype {dt} has no safetensors code; valid: {sorted(DTYPES)}")
    return _CODES[dt]


class SafetensorsFile(Mapping):
    """One ``.safetensors`` file: a read-only mapping from tensor name to numpy array.

    The header is parsed and validated on open; each tensor is a zero-copy view of a memory
    map of the file, so only the tensors touched are paged in.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointNotFoundError(f"safetensors file not found: {self.path}")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(
                    f"{self.path}: truncated safetensors file ({size} bytes, no 8-byte header "
                    "length)"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise SafetensorsError(
                    f"{self.path}: truncated safetensors file (header of {n} bytes but the file "
                    f"has {size} bytes)"
                )
            if n > _MAX_HEADER_BYTES:
                raise SafetensorsError(f"{self.path}: header of {n} bytes exceeds the 100 MB limit")
            raw = f.read(n)
            # Mapped now, from the file whose header this is (the path may be replaced later).
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(
                f"{self.path}: malformed safetensors JSON header ({e})"
            ) from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: malformed safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            self._entries[name] = self._parse_entry(name, info, data_size)

    def _parse_entry(self, name, info, data_size):
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(
                f"{self.path}: malformed header entry for tensor {name!r}: {info!r}"
            ) from None
        if code not in DTYPES:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has unknown dtype {code!r}; valid: {sorted(DTYPES)}"
            )
        dtype = DTYPES[code]
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has invalid shape {list(shape)} or data_offsets "
                f"[{begin}, {end}]"
            )
        if end > data_size:
            raise SafetensorsError(
                f"{self.path}: truncated safetensors file (tensor {name!r} ends at data byte "
                f"{end}, the file holds {data_size} data bytes)"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} "
                f"of {code} needs {math.prod(shape) * dtype.itemsize}"
            )
        return dtype, shape, begin

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name: str):
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} not in {self.path}")
        return self._entries[name]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entry(name)
        count = math.prod(shape)
        offset = self._data_start + begin
        if count == 0:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mmap, dtype, count, offset).reshape(shape)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only numpy arrays (views of a memory map)."""
    f = SafetensorsFile(path)
    return {name: f[name] for name in f}


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array) to ``path``, in name order, header padded to 8 bytes."""
    arrays = {name: np.asarray(tensors[name]) for name in sorted(tensors)}
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": dtype_code(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    # Write a temporary file, then rename: arrays memory-mapped from ``path`` (e.g. the input
    # of this very call) keep the old file, where truncating it in place would fault them.
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for a in arrays.values():
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Checkpoint(Mapping):
    """The tensors of a checkpoint directory: one ``model.safetensors``, shards listed by
    ``model.safetensors.index.json``, or (failing both) every ``*.safetensors`` file in it.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointNotFoundError(f"checkpoint directory not found: {self.directory}")
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            self._where = _read_index(index)
            fnames = sorted(set(self._where.values()))
        elif os.path.isfile(os.path.join(self.directory, SINGLE_FILE)):
            fnames = [SINGLE_FILE]
        else:
            fnames = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            if not fnames:
                raise CheckpointNotFoundError(f"no *.safetensors files in {self.directory}")
        for fname in fnames:
            if not os.path.isfile(os.path.join(self.directory, fname)):
                raise CheckpointNotFoundError(
                    f"safetensors file not found: {os.path.join(self.directory, fname)} "
                    f"(listed in {INDEX_FILE})"
                )
        # Opening parses and validates every header up front; data stays on disk until read.
        self.files = {f: SafetensorsFile(os.path.join(self.directory, f)) for f in fnames}
        if not os.path.isfile(index):
            self._where = {}
            for fname, shard in self.files.items():
                self._where.update(dict.fromkeys(shard, fname))

    def location(self, name: str) -> str:
        """Path of the file that holds tensor ``name``, or of the checkpoint if none does."""
        if name not in self._where:
            return self.directory
        return os.path.join(self.directory, self._where[name])

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.directory}")
        shard = self.files[self._where[name]]
        if name not in shard:
            raise SafetensorsError(
                f"{shard.path}: tensor {name!r} listed in {INDEX_FILE} is missing from the file"
            )
        return shard[name]

    def __contains__(self, name) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise SafetensorsError(f"{index}: malformed index (needs a 'weight_map' object)") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def save_checkpoint(
    tensors: Mapping[str, np.ndarray],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` into ``directory`` as ``model.safetensors``, or as shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when their total
    size exceeds ``max_shard_bytes``. Returns the file names written.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):  # a stale index or shard would shadow the new files
        if stale in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(stale):
            os.remove(os.path.join(directory, stale))
    names = sorted(tensors)
    total = sum(np.asarray(tensors[n]).nbytes for n in names)
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata)
        return [SINGLE_FILE]
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = np.asarray(tensors[n]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards, strict=True):
        save_file({n: tensors[n] for n in shard}, os.path.join(directory, fname), metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, INDEX_FILE]
