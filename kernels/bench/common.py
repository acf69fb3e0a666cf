"""What every ``kernels.bench`` op shares: timing, skip reasons, records, ``--impls``."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence

import jax


class UnavailableError(Exception):
    """A baseline that cannot run here; the message is the reason."""


@dataclasses.dataclass
class Prepared:
    """A callable, the arguments it is timed on, and how to read its output in the op's
    standard layout (attention: ``[B, T, N, H]`` prefill, ``[B, N, H]`` decode)."""

    fn: Callable
    args: tuple
    to_standard: Callable = lambda out: out
    note: str | None = None


def _need_backend(*backends: str) -> None:
    backend = jax.default_backend()
    if backend not in backends:
        raise UnavailableError(f"needs a {'/'.join(backends)} backend (running on {backend})")


def time_call(fn: Callable, args: Sequence, *, repeats: int, warmup: int) -> float:
    """Median seconds per call of ``fn(*args)`` over ``repeats`` samples, after ``warmup`` calls.

    A sample dispatches ``inner`` calls back to back and waits for the last, with ``inner``
    chosen so that a sample lasts about 5 ms: sub-millisecond kernels are then timed by their
    throughput rather than by one host round trip each (which would add its ~10-50 us).
    """
    for _ in range(max(warmup, 1)):  # the first call compiles
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        estimate = time.perf_counter() - start
    inner = int(min(max(5e-3 / max(estimate, 1e-6), 1), 100))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _print(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _parse_impls(parser, tokens, valid: list[str]) -> set[str] | None:
    """``--impls`` (space and/or comma separated) as a set; unknown names exit with the list."""
    if tokens is None:
        return None
    impls = {name for token in tokens for name in token.split(",") if name}
    unknown = sorted(impls - set(valid))
    if unknown:
        parser.error(f"unknown impls {unknown}; valid: {valid}")
    return impls
