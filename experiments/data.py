"""Offline data: byte-level corpora (the Python standard library, user text files) and
synthetic tasks (MQAR, copying), all served as fixed-shape numpy batches.

Nothing is downloaded. The default corpus is the ``.py`` source of the running interpreter's
standard library (~11 MB of bytes on CPython 3.11); ``kind="files"`` reads user text files by
glob. Both are split into train/validation by a hash of each file's relative path, tokenized
with ``experiments.tokenizer`` as BOS + bytes + EOS per document, and concatenated into one flat
uint16 array per split.

A batch depends only on ``(cfg.seed, step)``, never on what was drawn before, so a run resumed
from a checkpoint at step ``s`` sees exactly the batches the uninterrupted run saw.

    ds = make_dataset(DataConfig(kind="stdlib", seq_len=256, batch_size=8))
    batch = ds.batch(step)  # inputs, targets: int32 [B, T]; mask: float32 [B, T]
    evals = ds.eval_batches(4)  # fixed validation batches

Shape letters: B batch, T sequence length, X = T + 1 (a sequence before the next-token shift),
N flat corpus length, P key-value pairs, S query slots, L copy length.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import os
import pathlib
import sysconfig
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from experiments.tokenizer import BOS, EOS, VOCAB_SIZE

KINDS = ("stdlib", "files", "mqar", "copying")
SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5
# Third-party packages, the stdlib's own test suites, the IDLE app and the retired 2to3 tool.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
# Copying task: filler after the copy and the separator before it; data tokens are >= 2.
COPY_PAD = 0
COPY_SEP = 1
# MQAR reserves id 0 (never a key, value or noise token).
MQAR_RESERVED = 1
# Third entropy word of the eval rng. Training uses [seed, step], which numpy's SeedSequence
# treats like [seed, step, 0], so a non-zero tag keeps the two streams disjoint.
_EVAL_STREAM = 1
_GLOB_MAGIC = frozenset("*?[")

Batch = dict[str, np.ndarray]


def is_validation(relpath: str) -> bool:
    """Whether the file at ``relpath`` (posix, relative to the corpus root) is validation."""
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")


def _tokenize_files(paths: Sequence[pathlib.Path], max_bytes: int | None) -> np.ndarray:
    """BOS + bytes + EOS per file, concatenated: uint16 [N], read-only (it is cached).

    ``max_bytes`` caps the file bytes read (specials not counted); the last file is truncated.
    """
    bos, eos = np.array([BOS], np.uint16), np.array([EOS], np.uint16)
    pieces = []
    budget = max_bytes
    for path in paths:
        if budget is not None and budget <= 0:
            break
        data = path.read_bytes()
        if budget is not None:
            data = data[:budget]
            budget -= len(data)
        pieces += [bos, np.frombuffer(data, np.uint8), eos]
    tokens_N = np.concatenate(pieces, dtype=np.uint16) if pieces else np.zeros(0, np.uint16)
    tokens_N.flags.writeable = False
    return tokens_N


def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _stdlib_relpaths() -> tuple[str, ...]:
    root = _stdlib_root()
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        relpaths += [
            pathlib.Path(dirpath, f).relative_to(root).as_posix()
            for f in filenames
            if f.endswith(".py")
        ]
    return tuple(sorted(relpaths))


def stdlib_files(split: str) -> tuple[str, ...]:
    """Sorted posix paths, relative to the stdlib root, of the ``.py`` files in ``split``."""
    _check_split(split)
    want = split == "validation"
    return tuple(p for p in _stdlib_relpaths() if is_validation(p) == want)


@functools.lru_cache(maxsize=8)
def _load_stdlib(split: str, max_bytes: int | None) -> np.ndarray:
    return _tokenize_files([_stdlib_root() / p for p in stdlib_files(split)], max_bytes)


def load_stdlib(split: str, *, max_bytes: int | None = None) -> np.ndarray:
    """Tokens of the stdlib corpus split, cached in-process.

    Args:
      split: ``"train"`` or ``"validation"``.
      max_bytes: cap on the source bytes read for this split (smoke runs); None reads all.

    Returns:
      uint16 [N], read-only: BOS + bytes + EOS per file, files in sorted path order.
    """
    _check_split(split)
    _check_max_bytes(max_bytes)
    return _load_stdlib(split, max_bytes)


def _glob_root(pattern: str) -> str:
    """Longest leading directory of ``pattern`` without glob characters."""
    parts = pathlib.PurePath(pattern).parts[:-1]
    fixed = list(itertools.takewhile(lambda part: not _GLOB_MAGIC & set(part), parts))
    return os.path.join(*fixed) if fixed else "."


def load_text_files(pattern: str, split: str, *, max_bytes: int | None = None) -> np.ndarray:
    """Tokens of the files matching ``pattern`` (``**`` recursive) that fall in ``split``.

    The split hashes each path relative to the pattern's fixed leading directory, so it does not
    depend on the working directory.

    Returns:
      uint16 [N]: BOS + bytes + EOS per file, files in sorted relative-path order.
    """
    _check_split(split)
    _check_max_bytes(max_bytes)
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"no files match pattern {pattern!r}")
    root = _glob_root(pattern)
    want = split == "validation"
    rel = sorted(pathlib.Path(os.path.relpath(p, root)).as_posix() for p in paths)
    chosen = [pathlib.Path(root, r) for r in rel if is_validation(r) == want]
    return _tokenize_files(chosen, max_bytes)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_mqar(batch_size: int, seq_len: int, vocab_size: int, num_kv_pairs: int) -> None:
    _check_positive(batch_size=batch_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"mqar needs seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs}, got seq_len={seq_len}"
        )
    half = vocab_size // 2
    if min(half - MQAR_RESERVED, vocab_size - half) < num_kv_pairs:
        raise ValueError(
            f"mqar vocab_size={vocab_size} too small for num_kv_pairs={num_kv_pairs}: "
            f"need >= {2 * (num_kv_pairs + MQAR_RESERVED)}"
        )


def _check_copying(batch_size: int, seq_len: int, vocab_size: int, copy_len: int) -> None:
    _check_positive(batch_size=batch_size, seq_len=seq_len, copy_len=copy_len)
    if 2 * copy_len > seq_len:
        raise ValueError(
            f"copying needs seq_len >= 2 * copy_len = {2 * copy_len}, got seq_len={seq_len}"
        )
    if vocab_size < COPY_SEP + 2:
        raise ValueError(f"copying needs vocab_size >= {COPY_SEP + 2}, got {vocab_size}")


def _shifted(x_BX: np.ndarray, mask_BT: np.ndarray) -> Batch:
    """Next-token batch from sequences of ``T + 1`` tokens."""
    return {"inputs": x_BX[:, :-1].copy(), "targets": x_BX[:, 1:].copy(), "mask": mask_BT}


def _sample_distinct(rng: np.random.Generator, low: int, high: int, shape: tuple[int, int]):
    """[B, P] ids from ``[low, high)``, distinct within each row."""
    batch, num = shape
    return low + np.argsort(rng.random((batch, high - low)), axis=1)[:, :num].astype(np.int32)


def mqar(
    rng: np.random.Generator,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
) -> Batch:
    """Multi-query associative recall (Zoology, Arora et al. 2023, arXiv:2312.04927, §3).

    Each row is a sequence ``x`` of ``T + 1`` tokens with ``inputs = x[:-1]`` and
    ``targets = x[1:]``. ``x`` opens with ``P = num_kv_pairs`` pairs ``k1 v1 ... kP vP``: keys
    distinct, from ``[1, V//2)``; values distinct, from ``[V//2, V)``; id 0 is reserved. The rest
    of ``x`` is query slots at positions ``2P + 2g``; every key is asked again at its own slot
    with its value right after, so the target at a query position is that key's value. Slot
    ``g`` (the gap from the end of the pairs, in pairs) is drawn with weight
    ``(g + 1) ** (power_a - 1)``: a power law, mostly short gaps with a long tail. Query order is
    independent of pair order. Every other position holds uniform noise from ``[1, V)``.

    Returns:
      ``inputs``/``targets`` int32 [B, T]; ``mask`` float32 [B, T], 1 exactly at the P query
      positions of each row.
    """
    _check_mqar(batch_size, seq_len, vocab_size, num_kv_pairs)
    if not power_a > 0:
        raise ValueError(f"power_a must be positive, got {power_a}")
    B, T, P = batch_size, seq_len, num_kv_pairs
    context = 2 * P
    half = vocab_size // 2
    keys_BP = _sample_distinct(rng, MQAR_RESERVED, half, (B, P))
    values_BP = _sample_distinct(rng, half, vocab_size, (B, P))
    x_BX = rng.integers(MQAR_RESERVED, vocab_size, size=(B, T + 1), dtype=np.int32)
    x_BX[:, 0:context:2] = keys_BP
    x_BX[:, 1:context:2] = values_BP
    # Weighted sampling without replacement by Gumbel top-k; the last slot's key sits at T - 1.
    num_slots = (T + 1 - context) // 2
    log_weight_S = (power_a - 1.0) * np.log(np.arange(1, num_slots + 1))
    scores_BS = log_weight_S + rng.gumbel(size=(B, num_slots))
    slots_BP = rng.permuted(np.argsort(-scores_BS, axis=1)[:, :P], axis=1)
    query_BP = context + 2 * slots_BP
    rows_B1 = np.arange(B)[:, None]
    x_BX[rows_B1, query_BP] = keys_BP
    x_BX[rows_B1, query_BP + 1] = values_BP
    mask_BT = np.zeros((B, T), np.float32)
    mask_BT[rows_B1, query_BP] = 1.0
    return _shifted(x_BX, mask_BT)


def copying(
    rng: np.random.Generator, *, batch_size: int, seq_len: int, vocab_size: int, copy_len: int
) -> Batch:
    """Copying: ``L = copy_len`` random tokens, ``COPY_SEP``, the same tokens, then ``COPY_PAD``.

    Tokens are uniform in ``[2, V)``. As in ``mqar``, ``x`` has ``T + 1`` tokens,
    ``inputs = x[:-1]``, ``targets = x[1:]``.

    Returns:
      ``inputs``/``targets`` int32 [B, T]; ``mask`` float32 [B, T], 1 exactly at positions
      ``L .. 2L-1`` (from the separator on), whose targets are the copied tokens.
    """
    _check_copying(batch_size, seq_len, vocab_size, copy_len)
    B, T, L = batch_size, seq_len, copy_len
    tokens_BL = rng.integers(COPY_SEP + 1, vocab_size, size=(B, L), dtype=np.int32)
    x_BX = np.full((B, T + 1), COPY_PAD, np.int32)
    x_BX[:, :L] = tokens_BL
    x_BX[:, L] = COPY_SEP
    x_BX[:, L + 1 : 2 * L + 1] = tokens_BL
    mask_BT = np.zeros((B, T), np.float32)
    mask_BT[:, L : 2 * L] = 1.0
    return _shifted(x_BX, mask_BT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train and evaluate on.

    ``pattern`` is the glob for ``kind="files"``; ``vocab_size``, ``num_kv_pairs`` and
    ``copy_len`` are for the synthetic tasks (byte corpora always have ``VOCAB_SIZE``);
    ``max_bytes`` caps the bytes read per split of a corpus.
    """

    kind: str
    seq_len: int
    batch_size: int
    pattern: str | None = None
    seed: int = 0
    vocab_size: int = VOCAB_SIZE
    num_kv_pairs: int = 8
    copy_len: int = 16
    max_bytes: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind == "files" and not self.pattern:
            raise ValueError("kind='files' needs a glob pattern, got pattern=None")
        _check_positive(seq_len=self.seq_len, batch_size=self.batch_size)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _check_max_bytes(self.max_bytes)


class Dataset(Protocol):
    """What the trainer consumes; see ``make_dataset``."""

    vocab_size: int
    has_accuracy: bool

    def batch(self, step: int) -> Batch:
        """Training batch ``step``: ``inputs``/``targets`` int32 [B, T], ``mask`` float32 [B, T]."""
        ...

    def eval_batches(self, num: int) -> list[Batch]:
        """``num`` fixed evaluation batches, the same on every call."""
        ...


def _check_num(num: int) -> None:
    if num < 0:
        raise ValueError(f"number of eval batches must be >= 0, got {num}")


def _step_rng(seed: int, step: int) -> np.random.Generator:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return np.random.default_rng([seed, step])


def _windows(tokens_N: np.ndarray, starts_B: np.ndarray, seq_len: int) -> Batch:
    x_BX = tokens_N[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return _shifted(x_BX, np.ones((len(starts_B), seq_len), np.float32))


def _check_tokens(tokens_N: np.ndarray, seq_len: int, what: str) -> None:
    if tokens_N.size < seq_len + 1:
        raise ValueError(
            f"{what} has {tokens_N.size} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )


class CorpusDataset:
    """Random training windows of a flat token array; evenly spaced validation windows."""

    vocab_size = VOCAB_SIZE
    has_accuracy = False

    def __init__(self, cfg: DataConfig, train_N: np.ndarray, valid_N: np.ndarray, name: str):
        _check_tokens(train_N, cfg.seq_len, f"{name} train split")
        self.cfg, self.train_N, self.valid_N, self.name = cfg, train_N, valid_N, name

    def batch(self, step: int) -> Batch:
        rng = _step_rng(self.cfg.seed, step)
        high = self.train_N.size - self.cfg.seq_len
        return _windows(self.train_N, rng.integers(0, high, self.cfg.batch_size), self.cfg.seq_len)

    def eval_batches(self, num: int) -> list[Batch]:
        T, B = self.cfg.seq_len, self.cfg.batch_size
        _check_num(num)
        _check_tokens(self.valid_N, T, f"{self.name} validation split")
        starts = np.linspace(0, self.valid_N.size - T - 1, num * B).round().astype(np.int64)
        return [_windows(self.valid_N, s_B, T) for s_B in starts.reshape(num, B)]


class TaskDataset:
    """A synthetic task: batch ``step`` from rng ``[seed, step]``, evals from a separate stream."""

    has_accuracy = True

    def __init__(self, cfg: DataConfig, task: Callable[[np.random.Generator], Batch]):
        self.cfg, self.task, self.vocab_size = cfg, task, cfg.vocab_size

    def batch(self, step: int) -> Batch:
        return self.task(_step_rng(self.cfg.seed, step))

    def eval_batches(self, num: int) -> list[Batch]:
        _check_num(num)
        return [
            self.task(np.random.default_rng([self.cfg.seed, i, _EVAL_STREAM])) for i in range(num)
        ]


def make_dataset(cfg: DataConfig) -> CorpusDataset | TaskDataset:
    """The dataset ``cfg`` describes; task parameters are validated here, not at first batch."""
    if cfg.kind == "stdlib":
        train_N = load_stdlib("train", max_bytes=cfg.max_bytes)
        valid_N = load_stdlib("validation", max_bytes=cfg.max_bytes)
        return CorpusDataset(cfg, train_N, valid_N, "stdlib")
    if cfg.kind == "files":
        train_N = load_text_files(cfg.pattern, "train", max_bytes=cfg.max_bytes)
        valid_N = load_text_files(cfg.pattern, "validation", max_bytes=cfg.max_bytes)
        return CorpusDataset(cfg, train_N, valid_N, f"files {cfg.pattern!r}")
    common = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    if cfg.kind == "mqar":
        _check_mqar(num_kv_pairs=cfg.num_kv_pairs, **common)
        return TaskDataset(cfg, functools.partial(mqar, num_kv_pairs=cfg.num_kv_pairs, **common))
    if cfg.kind == "copying":
        _check_copying(copy_len=cfg.copy_len, **common)
        return TaskDataset(cfg, functools.partial(copying, copy_len=cfg.copy_len, **common))
    raise ValueError(f"unknown data kind {cfg.kind!r}; valid kinds: {', '.join(KINDS)}")
