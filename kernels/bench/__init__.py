"""Kernel benchmarks: Kestrel's paths against the baselines JAX ships, in the same process.

Prints one JSON line per measurement (or per skipped baseline, with ``"skipped": reason``)::

    python -m kernels.bench attention [--small] [--backward]        # attention.py
    python -m kernels.bench quant [--small]                         # quant.py (QuantCase)
    python -m kernels.bench grouped_matmul [--small] [--backward]   # grouped_matmul.py (GmmCase)
    python -m kernels.bench scan [--small] [--backward]             # scan.py (ScanCase)

Every op module documents its shapes, impls and record fields; ``common.py`` holds what they
share (``time_call``, skip reasons, ``--impls`` parsing). Every record carries ``op``,
``impl``, ``device`` (``device_kind``), ``backend``, ``jax`` and either ``seconds`` (per call:
the median over ``--repeats`` samples after ``--warmup`` calls; see ``time_call``) or
``skipped``. The names below are re-exported so callers (``kernels.gpucheck``, tests) use
``from kernels import bench`` alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kernels.bench.attention import (
    DECODE_IMPLS,
    PREFILL_IMPLS,
    SHAPES,
    SMALL_SHAPES,
    AttentionShape,
    _grad_of,
    _inputs,
    _jax_nn_decode,
    _jax_nn_prefill,
    _work,
    attention_main,
    bench_attention_shape,
)
from kernels.bench.common import (
    Prepared,
    UnavailableError,
    _need_backend,
    _parse_impls,
    _print,
    _reason,
    time_call,
)
from kernels.bench.grouped_matmul import (
    GMM_CASES,
    GMM_IMPLS,
    SMALL_GMM_CASES,
    GmmCase,
    bench_gmm_case,
    gmm_main,
)
from kernels.bench.quant import (
    QUANT_CASES,
    QUANT_IMPLS,
    SMALL_QUANT_CASES,
    QuantCase,
    bench_quant_case,
    quant_main,
)
from kernels.bench.scan import (
    SCAN_CASES,
    SCAN_IMPLS,
    SMALL_SCAN_CASES,
    ScanCase,
    bench_scan_case,
    scan_main,
)

__all__ = [
    "DECODE_IMPLS", "GMM_CASES", "GMM_IMPLS", "OPS", "PREFILL_IMPLS", "QUANT_CASES",
    "QUANT_IMPLS", "SCAN_CASES", "SCAN_IMPLS", "SHAPES", "SMALL_GMM_CASES", "SMALL_QUANT_CASES",
    "SMALL_SCAN_CASES", "SMALL_SHAPES", "AttentionShape", "GmmCase", "Prepared", "QuantCase",
    "ScanCase", "UnavailableError", "_grad_of", "_inputs", "_jax_nn_decode", "_jax_nn_prefill",
    "_need_backend", "_parse_impls", "_print", "_reason", "_work", "attention_main",
    "bench_attention_shape", "bench_gmm_case", "bench_quant_case", "bench_scan_case", "gmm_main",
    "main", "quant_main", "scan_main", "time_call",
]  # fmt: skip

OPS = {
    "attention": attention_main,
    "quant": quant_main,
    "grouped_matmul": gmm_main,
    "scan": scan_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m kernels.bench OP [options]; OP in {list(OPS)}")
            return 0
        print(f"kernels.bench: missing op; valid ops: {list(OPS)}", file=sys.stderr)
        return 2
    op, rest = argv[0], argv[1:]
    if op not in OPS:
        print(f"kernels.bench: unknown op {op!r}; valid ops: {list(OPS)}", file=sys.stderr)
        return 2
    return OPS[op](rest)
