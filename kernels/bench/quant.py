"""``python -m kernels.bench quant``: quantized GEMMs (``kernels.quant``) against bf16 XLA and
JAX's shipped Hopper mixed-type kernel, in the same process.

    python -m kernels.bench quant [--small] [--impls kestrel_xla jax_bf16] [--dtype float16]

Records: the ``QuantCase`` fields, ``impl``, ``dtype``, ``device``, ``backend``, ``jax``,
``seconds``; decode cases ``weight_bytes`` and ``tb_per_s`` (the weights as each path reads
them), prefill cases ``tflop_per_s`` (``2·M·K·N``); ``rel_err_vs_reference`` against
``kernels.quant``'s ``reference`` impl; ``vs_bf16`` (``seconds(jax_bf16) / seconds``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels.bench.common import (
    Prepared,
    UnavailableError,
    _need_backend,
    _parse_impls,
    _print,
    _reason,
    time_call,
)


@dataclasses.dataclass(frozen=True)
class QuantCase:
    """One quantized GEMM: ``x [M, K] @ w [K, N]`` with ``w`` in ``scheme`` (``group_size``)
    and, for W8A8, ``activations`` quantized per row."""

    phase: str  # "decode" (bound by weight bytes) or "prefill" (bound by FLOPs)
    M: int
    K: int
    N: int
    scheme: str
    group_size: int | None = None
    activations: str | None = None


# ISSUE 5's acceptance shapes: the decode GEMM of a 70B-class FFN and a square prefill GEMM.
QUANT_CASES = [
    QuantCase("decode", 16, 8192, 28672, "int8"),
    QuantCase("decode", 16, 8192, 28672, "int4", 128),
    QuantCase("decode", 16, 8192, 28672, "fp8"),
    QuantCase("prefill", 8192, 8192, 8192, "int8", activations="int8"),
    QuantCase("prefill", 8192, 8192, 8192, "fp8", activations="fp8"),
]
SMALL_QUANT_CASES = [
    QuantCase("decode", 16, 512, 1024, "int8"),
    QuantCase("decode", 16, 512, 1024, "int4", 128),
    QuantCase("prefill", 256, 256, 256, "int8", activations="int8"),
]


def _quant_kestrel(impl):
    def build(case, x, w, qw):
        from kernels import quant

        fn = jax.jit(lambda x, qw: quant.matmul(x, qw, activations=case.activations, impl=impl))
        return Prepared(fn, (x, qw))

    return build


def _quant_bf16(case, x, w, qw):
    return Prepared(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=x.dtype)), (x, w))


def _quant_mixed_mgpu(case, x, w, qw):
    """JAX's shipped Hopper int8 x bf16 kernel on ``w^T @ x^T`` (int8 must be its LHS). It
    applies no scales, so its time is a lower bound for a scaled W8A16 matmul."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    _need_backend("gpu")
    if case.scheme != "int8" or case.activations is not None:
        raise UnavailableError("int8 weight-only only (the kernel takes int8 x bf16)")
    config = mixed.TuningConfig(tile_m=128, tile_n=max(16, case.M), tile_k=128,
                                max_concurrent_steps=4, epi_tile_n=None)  # fmt: skip
    fn = jax.jit(lambda wt, xt: mixed.mixed_matmul_kernel(wt, xt, out_dtype=x.dtype, config=config))
    return Prepared(fn, (qw.values.T, x.T), to_standard=lambda out: out.T, note="no scales")


QUANT_IMPLS = {
    "jax_bf16": _quant_bf16,  # first: later records get vs_bf16
    **{f"kestrel_{i}": _quant_kestrel(i) for i in ("xla", "pallas_gpu", "pallas_tpu")},
    "jax_pallas_mixed_mgpu": _quant_mixed_mgpu,
}


def bench_quant_case(case: QuantCase, *, dtype, impls, repeats, warmup, emit):
    from kernels import quant

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((case.M, case.K), np.float32)).astype(dtype)
    w = jnp.asarray(rng.standard_normal((case.K, case.N), np.float32) * 0.02).astype(dtype)
    qw = quant.quantize(w, case.scheme, group_size=case.group_size)
    reference = quant.matmul(x, qw, activations=case.activations, impl="reference")
    reference = reference.astype(jnp.float32)
    base = None
    for name, build in QUANT_IMPLS.items():
        if impls is not None and name not in impls:
            continue
        record = {"op": "quant", "phase": case.phase, **dataclasses.asdict(case), "impl": name,
                  "dtype": jnp.dtype(dtype).name, "device": jax.devices()[0].device_kind,
                  "backend": jax.default_backend(), "jax": jax.__version__}  # fmt: skip
        try:
            prepared = build(case, x, w, qw)
            if prepared.note:
                record["note"] = prepared.note
            seconds = time_call(prepared.fn, prepared.args, repeats=repeats, warmup=warmup)
            record["seconds"] = seconds
            if case.phase == "decode":  # the weights' bytes, as this path reads them
                nbytes = w.nbytes if name == "jax_bf16" else qw.nbytes
                record.update(weight_bytes=nbytes, tb_per_s=nbytes / seconds / 1e12)
            else:
                record["tflop_per_s"] = 2 * case.M * case.K * case.N / seconds / 1e12
            out = prepared.to_standard(prepared.fn(*prepared.args)).astype(jnp.float32)
            err = jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)
            record["rel_err_vs_reference"] = float(err)
            if name == "jax_bf16":
                base = seconds
            if base is not None:
                record["vs_bf16"] = base / seconds
        except Exception as e:
            record["skipped"] = str(e) if isinstance(e, UnavailableError) else _reason(e)
        emit(record)


def quant_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench quant", description="Benchmark quantized matmuls."
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=None, help=f"subset of {list(QUANT_IMPLS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
    args = parser.parse_args(argv)
    impls = _parse_impls(parser, args.impls, list(QUANT_IMPLS))
    for case in SMALL_QUANT_CASES if args.small else QUANT_CASES:
        bench_quant_case(
            case, dtype=jnp.dtype(args.dtype), impls=impls, repeats=args.repeats,
            warmup=args.warmup, emit=_print,
        )  # fmt: skip
    return 0
