"""Kernel benchmarks: Kestrel's paths against the baselines JAX ships, in the same process.

Prints one JSON line per measurement (or per skipped baseline, with ``"skipped": reason``)::

    python -m kernels.bench attention                        # BASELINES.md shapes, forward
    python -m kernels.bench attention --shapes prefill --backward --repeats 20
    python -m kernels.bench attention --impls kestrel_xla,jax_cudnn,jax_pallas_mgpu
    python -m kernels.bench attention --small                # tiny shapes, seconds on CPU
    python -m kernels.bench quant [--small]                  # quantized GEMMs (QuantCase)
    python -m kernels.bench grouped_matmul [--small] [--backward]   # MoE GEMMs (GmmCase)

Default attention shapes are those of ``BASELINES.md`` (H100 numbers): causal prefill B4 T4096
S4096 N32 K32 H128 and decode B32 N32 K8 S8192 H128 (a full cache), in ``--dtype``.

Record fields: ``op``, ``phase`` (``prefill`` / ``decode``), ``pass`` (``fwd`` / ``bwd``),
``shape`` (B, T, S, N, K, H, causal, dtype), ``impl``, ``device`` (``device_kind``),
``backend``, ``jax``, ``seconds`` (per call: the median over ``--repeats`` samples after
``--warmup`` calls, each sample ~5 ms of calls dispatched back to back and ended by
``jax.block_until_ready``; see ``time_call``), and

- prefill: ``flops`` and ``tflop_per_s``. FLOPs count the two matmuls, ``4·B·T·S·N·H``,
  halved when causal (the convention of BASELINES.md; masked blocks are not work). The
  ``bwd`` pass times a jitted ``jax.grad`` of ``sum(out)`` with respect to q, k, v (forward
  plus backward, as BASELINES.md did) and counts 2.5x the forward FLOPs.
- decode: ``bytes`` and ``tb_per_s``. Bytes count K and V read once (``2·B·S·K·H``) plus q
  and the output (``2·B·N·H``), times the item size: decode is memory-bound.
- ``max_abs_err`` (forward only): against Kestrel's ``reference`` impl on the same inputs.
- ``vs_cudnn``: ``seconds(jax_cudnn) / seconds``, > 1 means faster than cuDNN; present when
  ``jax_cudnn`` was measured for the same shape and pass (it is measured first).

Impls: ``kestrel_<name>`` for each name in ``kernels.attention.IMPLS`` except ``auto``;
``jax_xla`` / ``jax_cudnn`` (``jax.nn.dot_product_attention``); JAX's shipped Pallas ops
``jax_pallas_triton_mha`` (``pallas.ops.gpu.attention.mha``), ``jax_pallas_mgpu``
(``pallas.ops.gpu.attention_mgpu``, Hopper), ``jax_pallas_decode_gqa``
(``pallas.ops.gpu.decode_attention.gqa``), ``jax_pallas_tpu_flash``
(``pallas.ops.tpu.flash_attention``); ``tokamax`` when installed. Layout changes a baseline
needs (transposes, pre-scaling q) happen once, outside the timed call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention as kattn


class UnavailableError(Exception):
    """A baseline that cannot run here; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """One attention problem; ``T == 1`` with a ``[B, N, H]`` query for decode."""

    phase: str
    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    causal: bool

    def as_dict(self, dtype: str) -> dict:
        d = dataclasses.asdict(self)
        del d["phase"]
        return {**d, "dtype": dtype}


# BASELINES.md: prefill B4 T4096 N32 H128 causal, decode B32 N32 K8 S8192 H128.
SHAPES = {
    "prefill": AttentionShape("prefill", B=4, T=4096, S=4096, N=32, K=32, H=128, causal=True),
    "decode": AttentionShape("decode", B=32, T=1, S=8192, N=32, K=8, H=128, causal=True),
}
# Tiny shapes that still meet the shipped GPU kernels' tiling (H % 64, T % 128).
SMALL_SHAPES = {
    "prefill": AttentionShape("prefill", B=1, T=256, S=256, N=4, K=4, H=64, causal=True),
    "decode": AttentionShape("decode", B=2, T=1, S=256, N=4, K=2, H=64, causal=True),
}


@dataclasses.dataclass
class Prepared:
    """A callable, the arguments it is timed on, and how to read its output as ``[B, T, N, H]``
    (prefill) or ``[B, N, H]`` (decode)."""

    fn: Callable
    args: tuple
    to_standard: Callable = lambda out: out
    note: str | None = None


def _need_backend(*backends: str) -> None:
    backend = jax.default_backend()
    if backend not in backends:
        raise UnavailableError(f"needs a {'/'.join(backends)} backend (running on {backend})")


def _kestrel_prefill(impl):
    def build(shape, q, k, v):
        return Prepared(
            functools.partial(kattn.attention, causal=shape.causal, impl=impl), (q, k, v)
        )

    return build


def _kestrel_decode(impl):
    def build(shape, q, k, v, lengths):
        return Prepared(functools.partial(kattn.decode_attention, impl=impl), (q, k, v, lengths))

    return build


def _jax_nn_prefill(implementation):
    def build(shape, q, k, v):
        if implementation == "cudnn":
            _need_backend("gpu")
        fn = jax.jit(
            functools.partial(
                jax.nn.dot_product_attention, is_causal=shape.causal, implementation=implementation
            )
        )
        return Prepared(fn, (q, k, v))

    return build


def _jax_nn_decode(implementation):
    def build(shape, q, k, v, lengths):
        if implementation == "cudnn":
            _need_backend("gpu")

        @jax.jit
        def fn(q_BNH, k, v, lengths):
            out = jax.nn.dot_product_attention(
                q_BNH[:, None],
                k,
                v,
                key_value_seq_lengths=lengths,
                implementation=implementation,
            )
            return out[:, 0]

        return Prepared(fn, (q, k, v, lengths))

    return build


def _pallas_triton_mha(shape, q, k, v):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    _need_backend("gpu")
    if shape.K != shape.N:
        raise UnavailableError(f"mha needs K == N (no GQA), got N={shape.N} K={shape.K}")
    fn = jax.jit(
        functools.partial(
            gpu_attention.mha, segment_ids=None, sm_scale=shape.H**-0.5, causal=shape.causal
        )
    )
    return Prepared(fn, (q, k, v))


def _pallas_mgpu(shape, q, k, v):
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    _need_backend("gpu")
    blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=shape.causal, **blocks
    )
    # This kernel applies no softmax scale: scale q once, outside the timed call. It takes
    # float16 only (JAX 0.11.2): bfloat16 inputs are cast once, and the record says so.
    dtype = jnp.float16 if q.dtype == jnp.bfloat16 else q.dtype
    q_scaled = (q.astype(jnp.float32) * shape.H**-0.5).astype(dtype)
    fn = jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, config))
    note = "ran in float16 (the kernel rejects bfloat16)" if dtype != q.dtype else None
    return Prepared(fn, (q_scaled, k.astype(dtype), v.astype(dtype)), note=note)


def _pallas_tpu_flash(shape, q, k, v):
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    _need_backend("tpu")
    if shape.K != shape.N:
        raise UnavailableError(f"TPU flash_attention needs K == N, got N={shape.N} K={shape.K}")
    fn = jax.jit(
        functools.partial(tpu_flash.flash_attention, causal=shape.causal, sm_scale=shape.H**-0.5)
    )
    to_bnth = lambda x: jnp.swapaxes(x, 1, 2)  # BTNH <-> BNTH
    return Prepared(fn, tuple(to_bnth(a) for a in (q, k, v)), to_standard=to_bnth)


def _pallas_decode_gqa(shape, q, k, v, lengths):
    from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode

    _need_backend("gpu")
    fn = jax.jit(lambda q, k, v, lengths: gpu_decode.gqa(q, k, v, kv_seq_len=lengths))
    return Prepared(fn, (q, k, v, lengths))


def _tokamax_prefill(shape, q, k, v):
    try:
        import tokamax
    except ImportError as e:
        raise UnavailableError(f"tokamax not installed ({e})") from None
    fn = jax.jit(functools.partial(tokamax.dot_product_attention, is_causal=shape.causal))
    return Prepared(fn, (q, k, v))


def _tokamax_decode(shape, q, k, v, lengths):
    try:
        import tokamax
    except ImportError as e:
        raise UnavailableError(f"tokamax not installed ({e})") from None
    fn = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q[:, None], k, v)[:, 0])
    return Prepared(fn, (q, k, v))


_KESTREL = [i for i in kattn.IMPLS if i != "auto"]
# jax_cudnn first: every later record of the same shape and pass gets ``vs_cudnn``.
PREFILL_IMPLS = {
    "jax_cudnn": _jax_nn_prefill("cudnn"),
    **{f"kestrel_{i}": _kestrel_prefill(i) for i in _KESTREL},
    "jax_xla": _jax_nn_prefill("xla"),
    "jax_pallas_triton_mha": _pallas_triton_mha,
    "jax_pallas_mgpu": _pallas_mgpu,
    "jax_pallas_tpu_flash": _pallas_tpu_flash,
    "tokamax": _tokamax_prefill,
}
DECODE_IMPLS = {
    "jax_cudnn": _jax_nn_decode("cudnn"),
    **{f"kestrel_{i}": _kestrel_decode(i) for i in _KESTREL},
    "jax_xla": _jax_nn_decode("xla"),
    "jax_pallas_decode_gqa": _pallas_decode_gqa,
    "tokamax": _tokamax_decode,
}


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


def _grad_of(fn: Callable) -> Callable:
    loss = lambda *args: jnp.sum(fn(*args).astype(jnp.float32))
    return jax.jit(lambda q, k, v, *rest: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, *rest))


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _inputs(shape: AttentionShape, dtype, seed: int = 0):
    """Standard-normal q, k, v (drawn by numpy: no compile) and a full cache for decode."""
    rng = np.random.default_rng(seed)
    q_shape = (shape.B, shape.T, shape.N, shape.H)
    if shape.phase == "decode":
        q_shape = (shape.B, shape.N, shape.H)
    kv_shape = (shape.B, shape.S, shape.K, shape.H)
    draw = lambda dims: jnp.asarray(rng.standard_normal(dims, np.float32).astype(dtype))
    q, k, v = draw(q_shape), draw(kv_shape), draw(kv_shape)
    if shape.phase == "decode":
        return q, k, v, jnp.full((shape.B,), shape.S, jnp.int32)
    return q, k, v


def _work(shape: AttentionShape, pass_: str, itemsize: int) -> dict:
    if shape.phase == "decode":
        kv = 2 * shape.B * shape.S * shape.K * shape.H
        return {"bytes": (kv + 2 * shape.B * shape.N * shape.H) * itemsize}
    flops = 4 * shape.B * shape.T * shape.S * shape.N * shape.H
    flops = flops / 2 if shape.causal else flops
    return {"flops": flops * (2.5 if pass_ == "bwd" else 1.0)}


def bench_attention_shape(shape, *, dtype, passes, impls, repeats, warmup, emit):
    """Measure every selected impl on one shape; ``emit`` receives one dict per record."""
    dtype_name = jnp.dtype(dtype).name
    builders = PREFILL_IMPLS if shape.phase == "prefill" else DECODE_IMPLS
    inputs = _inputs(shape, dtype)
    reference = None
    for pass_ in passes:
        cudnn_seconds = None
        for name, build in builders.items():
            if impls is not None and name not in impls:
                continue
            record = {
                "op": "attention",
                "phase": shape.phase,
                "pass": pass_,
                "shape": shape.as_dict(dtype_name),
                "impl": name,
                "device": jax.devices()[0].device_kind,
                "backend": jax.default_backend(),
                "jax": jax.__version__,
            }
            try:
                prepared = build(shape, *inputs)
                if prepared.note:
                    record["note"] = prepared.note
                fn = prepared.fn if pass_ == "fwd" else _grad_of(prepared.fn)
                seconds = time_call(fn, prepared.args, repeats=repeats, warmup=warmup)
                record["seconds"] = seconds
                for key, amount in _work(shape, pass_, jnp.dtype(dtype).itemsize).items():
                    record[key] = amount
                    unit = "tflop_per_s" if key == "flops" else "tb_per_s"
                    record[unit] = amount / seconds / 1e12
                if pass_ == "fwd":
                    if reference is None:
                        reference = _reference_output(shape, inputs)
                    out = prepared.to_standard(fn(*prepared.args)).astype(jnp.float32)
                    record["max_abs_err"] = float(jnp.max(jnp.abs(out - reference)))
                if name == "jax_cudnn":
                    cudnn_seconds = seconds
                if cudnn_seconds is not None:
                    record["vs_cudnn"] = cudnn_seconds / seconds
            except Exception as e:  # every baseline may be unavailable here: say why
                record["skipped"] = str(e) if isinstance(e, UnavailableError) else _reason(e)
            emit(record)


def _reference_output(shape, inputs):
    if shape.phase == "decode":
        out = kattn.decode_attention(*inputs, impl="reference")
    else:
        out = kattn.attention(*inputs, causal=shape.causal, impl="reference")
    return out.astype(jnp.float32)


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


def attention_main(argv: Sequence[str]) -> int:
    valid = sorted(set(PREFILL_IMPLS) | set(DECODE_IMPLS))
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench attention", description="Benchmark attention kernels."
    )
    parser.add_argument("--shapes", choices=["prefill", "decode", "all"], default="all")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument(
        "--impls", nargs="+", default=None, help=f"comma/space separated subset of {valid}"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1)")
    parser.add_argument("--backward", action="store_true", help="also time prefill gradients")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
    args = parser.parse_args(argv)
    impls = _parse_impls(parser, args.impls, valid)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    table = SMALL_SHAPES if args.small else SHAPES
    phases = ["prefill", "decode"] if args.shapes == "all" else [args.shapes]
    for phase in phases:
        passes = ["fwd", "bwd"] if phase == "prefill" and args.backward else ["fwd"]
        bench_attention_shape(
            table[phase],
            dtype=jnp.dtype(args.dtype),
            passes=passes,
            impls=impls,
            repeats=args.repeats,
            warmup=args.warmup,
            emit=_print,
        )
    return 0


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


@dataclasses.dataclass(frozen=True)
class GmmCase:
    """One MoE grouped matmul: ``M`` routed rows over ``E`` experts, ``[K] -> [N]`` each; group
    sizes are a seeded multinomial draw (near-balanced, as after a load-balancing loss)."""

    name: str
    M: int
    K: int
    N: int
    E: int

    def group_sizes(self) -> np.ndarray:
        return np.random.default_rng(0).multinomial(self.M, np.ones(self.E) / self.E)


# Mixtral 8x7B's up-projection (E8, top-2, d4096 -> 14336; arXiv:2401.04088) and a
# DeepSeekMoE-style fine-grained one (E64, top-6, d2048 -> 1408; arXiv:2401.06066), 8192 tokens.
GMM_CASES = [
    GmmCase("mixtral_up", M=8192 * 2, K=4096, N=14336, E=8),
    GmmCase("fine_grained_up", M=8192 * 6, K=2048, N=1408, E=64),
]
SMALL_GMM_CASES = [GmmCase("small", M=256, K=128, N=256, E=4)]


def _gmm_kestrel(impl):
    def build(case, x, w, sizes):
        from kernels import moe

        return Prepared(jax.jit(functools.partial(moe.grouped_matmul, impl=impl)), (x, w, sizes))

    return build


def _gmm_ragged_dot(case, x, w, sizes):
    return Prepared(jax.jit(jax.lax.ragged_dot), (x, w, sizes))


def _gmm_dense_padded(case, x, w, sizes):
    """Rows scattered to ``[E, C, K]`` with ``C`` the largest group (padded to 128), one
    batched einsum, gathered back: the capacity-style dense dispatch."""
    sizes_np = np.asarray(sizes)
    C = -(-int(sizes_np.max()) // 128) * 128
    group = np.repeat(np.arange(case.E), sizes_np)
    slot = np.arange(case.M) - np.repeat(np.cumsum(sizes_np) - sizes_np, sizes_np)

    def fn(x, w, group, slot):
        x_ECK = jnp.zeros((case.E, C, case.K), x.dtype).at[group, slot].set(x)
        y_ECN = jnp.einsum("eck,ekn->ecn", x_ECK, w, preferred_element_type=jnp.float32)
        return y_ECN[group, slot].astype(x.dtype)

    args = (x, w, jnp.asarray(group, jnp.int32), jnp.asarray(slot, jnp.int32))
    return Prepared(jax.jit(fn), args, note=f"capacity {C}")


def _gmm_megablox(case, x, w, sizes):
    """JAX's shipped Pallas TPU grouped matmul; its tiles must divide the shape."""
    from jax.experimental.pallas.ops.tpu import megablox

    _need_backend("tpu")
    tiling = tuple(
        next((t for t in (512, 256, 128) if d % t == 0), d) for d in (case.M, case.K, case.N)
    )
    fn = jax.jit(lambda x, w, s: megablox.gmm(x, w, s, x.dtype, tiling))
    return Prepared(fn, (x, w, sizes), note=f"tiling {tiling}")


GMM_IMPLS = {
    "jax_ragged_dot": _gmm_ragged_dot,  # first: later records get vs_ragged_dot
    **{f"kestrel_{i}": _gmm_kestrel(i) for i in ("xla", "pallas_tpu", "pallas_gpu")},
    "dense_padded": _gmm_dense_padded,
    "jax_pallas_megablox": _gmm_megablox,
}


def _gmm_grad(fn: Callable) -> Callable:
    loss = lambda x, w, *rest: jnp.sum(fn(x, w, *rest).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def bench_gmm_case(case: GmmCase, *, dtype, passes, impls, repeats, warmup, emit):
    """Times each impl on ``case``; ``bwd`` is ``jax.grad`` of ``sum(out)`` wrt ``x`` and
    ``w`` (forward plus both backward products: 3x the forward's ``2 M K N`` FLOPs)."""
    from kernels import moe

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((case.M, case.K), np.float32)).astype(dtype)
    w = jnp.asarray(rng.standard_normal((case.E, case.K, case.N), np.float32) * 0.02)
    w, sizes = w.astype(dtype), jnp.asarray(case.group_sizes(), jnp.int32)
    reference = moe.grouped_matmul(x, w, sizes, impl="reference").astype(jnp.float32)
    for pass_ in passes:
        base = None
        for name, build in GMM_IMPLS.items():
            if impls is not None and name not in impls:
                continue
            record = {"op": "grouped_matmul", **dataclasses.asdict(case), "pass": pass_,
                      "impl": name, "dtype": jnp.dtype(dtype).name,
                      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                      "jax": jax.__version__}  # fmt: skip
            try:
                prepared = build(case, x, w, sizes)
                if prepared.note:
                    record["note"] = prepared.note
                fn = prepared.fn if pass_ == "fwd" else _gmm_grad(prepared.fn)
                seconds = time_call(fn, prepared.args, repeats=repeats, warmup=warmup)
                flops = 2 * case.M * case.K * case.N * (3 if pass_ == "bwd" else 1)
                record.update(seconds=seconds, flops=flops, tflop_per_s=flops / seconds / 1e12)
                if pass_ == "fwd":
                    out = prepared.fn(*prepared.args).astype(jnp.float32)
                    err = jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)
                    record["rel_err_vs_reference"] = float(err)
                if name == "jax_ragged_dot":
                    base = seconds
                if base is not None:
                    record["vs_ragged_dot"] = base / seconds
            except Exception as e:
                record["skipped"] = str(e) if isinstance(e, UnavailableError) else _reason(e)
            emit(record)


def gmm_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench grouped_matmul",
        description="Benchmark MoE grouped matmuls.",
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=None, help=f"subset of {list(GMM_IMPLS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backward", action="store_true", help="also time gradients")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
    args = parser.parse_args(argv)
    impls = _parse_impls(parser, args.impls, list(GMM_IMPLS))
    for case in SMALL_GMM_CASES if args.small else GMM_CASES:
        bench_gmm_case(
            case, dtype=jnp.dtype(args.dtype), passes=["fwd", "bwd"] if args.backward else ["fwd"],
            impls=impls, repeats=args.repeats, warmup=args.warmup, emit=_print,
        )  # fmt: skip
    return 0


OPS = {"attention": attention_main, "quant": quant_main, "grouped_matmul": gmm_main}


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


if __name__ == "__main__":
    sys.exit(main())
