"""``python -m kernels.bench scan``: ``kernels.scan.chunked_scan`` per impl against the
token-by-token ``lax.scan`` oracle (``impl="reference"``), in the same process.

    python -m kernels.bench scan                       # Mamba-2 shape, forward, bfloat16
    python -m kernels.bench scan --backward --impls kestrel_reference kestrel_pallas_gpu
    python -m kernels.bench scan --small --backward    # tiny shapes, seconds on CPU

The default case is one Mamba-2 1.3B mixer layer's scan (Dao & Gu, arXiv:2405.21060: d_model
2048, expand 2, head dim 64 -> 64 heads, d_state 128, one B/C group) over a 4096-token batch of
8: B8 T4096 H64 G1 K128 V64, chunk 64. The second case is a gated-linear-attention scan (Yang
et al., arXiv:2312.06635) with one decay per key dimension (``log_decay [B, T, H, K]``):
B16 T2048 H8 G8 K128 V128, chunk 64; heads of ``K = V = 128`` (a ``[128, 128]`` float32 state
in one warpgroup's registers in the GPU kernel), 128 (batch, head) programs for the H100's 132
SMs. Inputs are drawn by numpy (no compile): q standard normal, k standard normal / sqrt(K), v
standard normal in ``--dtype``, and a float32 ``log_decay = -softplus(N(0, 1))`` (as ``dt * A``
is kept in float32), ``[B, T, H, K]`` for a ``vector`` case.

Records: the ``ScanCase`` fields, ``pass`` (``fwd`` / ``bwd``), ``impl``, ``dtype``,
``device``, ``backend``, ``jax``, ``seconds`` (``time_call``), ``tokens_per_s``
(``B·T / seconds``), ``vs_reference`` (``seconds(kestrel_reference) / seconds``, > 1 is faster
than the token-by-token scan; present once the reference was measured for the same pass), and
forward only ``max_abs_err``, ``rel_err_vs_reference`` (outputs, Frobenius) and
``state_rel_err_vs_reference`` (final state), all against the ``reference`` impl on the same
inputs cast to float32. ``bwd`` times a jitted ``jax.grad`` of ``sum(o)`` with respect to q, k,
v and log_decay (forward plus backward). Impls that cannot run here (a Pallas path off its
backend, or the oracle's backward running out of memory: ``lax.scan`` saves one ``[B, H, K, V]``
float32 state per token) are ``"skipped"`` lines with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import scan as kscan
from kernels.bench.common import (
    Prepared,
    UnavailableError,
    _parse_impls,
    _print,
    _reason,
    time_call,
)


@dataclasses.dataclass(frozen=True)
class ScanCase:
    """One scan: q, k ``[B, T, G, K]``, v ``[B, T, H, V]``, log_decay ``[B, T, H]`` (or
    ``[B, T, H, K]`` with ``vector``: one decay per key dimension)."""

    name: str
    B: int
    T: int
    H: int
    G: int
    K: int
    V: int
    chunk: int
    vector: bool = False


SCAN_CASES = [
    ScanCase("mamba2_1.3b", B=8, T=4096, H=64, G=1, K=128, V=64, chunk=64),
    ScanCase("gla_k128_v128", B=16, T=2048, H=8, G=8, K=128, V=128, chunk=64, vector=True),
]
# T not a multiple of the chunk: the tail chunk is padded. K, V, chunk meet the GPU kernel's 64s.
SMALL_SCAN_CASES = [ScanCase("small", B=2, T=200, H=4, G=1, K=64, V=64, chunk=64)]


def _scan_kestrel(impl: str):
    def build(case, q, k, v, a):
        fn = functools.partial(kscan.chunked_scan, chunk_size=case.chunk, impl=impl)
        return Prepared(fn, (q, k, v, a))

    return build


# kestrel_reference first: every later record of the same pass gets ``vs_reference``.
SCAN_IMPLS = {f"kestrel_{i}": _scan_kestrel(i) for i in kscan.IMPLS if i != "auto"}


def _scan_inputs(case: ScanCase, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    draw = lambda *dims: rng.standard_normal(dims, np.float32)
    q = draw(case.B, case.T, case.G, case.K)
    k = draw(case.B, case.T, case.G, case.K) / np.sqrt(case.K)
    v = draw(case.B, case.T, case.H, case.V)
    a = -np.logaddexp(0.0, draw(case.B, case.T, case.H, *(case.K,) * case.vector))
    return (*(jnp.asarray(x.astype(dtype)) for x in (q, k, v)), jnp.asarray(a, jnp.float32))


def _scan_grad(fn: Callable) -> Callable:
    # Squared, so the backward needs the forward's output (a linear loss lets XLA drop the
    # forward kernel as dead code and time the backward alone).
    loss = lambda *args: jnp.sum(jnp.square(fn(*args)[0].astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _rel_err(x, reference) -> float:
    x = x.astype(jnp.float32)
    return float(jnp.linalg.norm(x - reference) / jnp.linalg.norm(reference))


def bench_scan_case(case: ScanCase, *, dtype, passes, impls, repeats, warmup, emit):
    """Measure every selected impl on ``case``; ``emit`` receives one dict per record."""
    inputs = _scan_inputs(case, dtype)
    reference = None
    for pass_ in passes:
        base = None
        for name, build in SCAN_IMPLS.items():
            if impls is not None and name not in impls:
                continue
            record = {"op": "scan", **dataclasses.asdict(case), "pass": pass_, "impl": name,
                      "dtype": jnp.dtype(dtype).name, "device": jax.devices()[0].device_kind,
                      "backend": jax.default_backend(), "jax": jax.__version__}  # fmt: skip
            try:
                prepared = build(case, *inputs)
                fn = prepared.fn if pass_ == "fwd" else _scan_grad(prepared.fn)
                seconds = time_call(fn, prepared.args, repeats=repeats, warmup=warmup)
                record.update(seconds=seconds, tokens_per_s=case.B * case.T / seconds)
                if pass_ == "fwd":
                    if reference is None:
                        f32 = [x.astype(jnp.float32) for x in inputs]
                        reference = kscan.chunked_scan(*f32, impl="reference")
                    o, state = prepared.fn(*prepared.args)
                    o_ref, state_ref = reference
                    o = o.astype(jnp.float32)
                    record["max_abs_err"] = float(jnp.max(jnp.abs(o - o_ref)))
                    record["rel_err_vs_reference"] = _rel_err(o, o_ref)
                    record["state_rel_err_vs_reference"] = _rel_err(state, state_ref)
                if name == "kestrel_reference":
                    base = seconds
                if base is not None:
                    record["vs_reference"] = base / seconds
            except Exception as e:  # a Pallas path off its backend, out of memory: say why
                record["skipped"] = str(e) if isinstance(e, UnavailableError) else _reason(e)
            emit(record)


def scan_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench scan", description="Benchmark chunked linear scans."
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=None, help=f"subset of {list(SCAN_IMPLS)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1)")
    parser.add_argument("--backward", action="store_true", help="also time gradients")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
    args = parser.parse_args(argv)
    impls = _parse_impls(parser, args.impls, list(SCAN_IMPLS))
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for case in SMALL_SCAN_CASES if args.small else SCAN_CASES:
        bench_scan_case(
            case, dtype=jnp.dtype(args.dtype), passes=["fwd", "bwd"] if args.backward else ["fwd"],
            impls=impls, repeats=args.repeats, warmup=args.warmup, emit=_print,
        )  # fmt: skip
    return 0
