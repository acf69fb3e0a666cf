"""One-call GPU check of the Mosaic GPU attention and quantized-matmul kernels: correctness on
the hardware, then block-size sweeps and the baselines of ``kernels.bench``, in one process.

Meant for a short lease of one H100 (see README "On a GPU")::

    python -m kernels.gpucheck --out $OUT            # everything
    python -m kernels.gpucheck --out $OUT --only correct,sweep
    python -m kernels.gpucheck --out $OUT --only quant_correct,quant_sweep,quant_bench
    python -m kernels.gpucheck --out $OUT --only scan_bench,gmm_bench

Each step writes JSON lines to ``<out>/gpucheck.jsonl`` as it goes (a crash loses nothing
already measured) and a failing case records its error instead of stopping the run.
Correctness compares against ``impl="reference"`` on float32 upcasts of fresh random inputs by
``|out - ref| / |ref|`` (bf16 operands: about 1e-3 to 1e-2); outputs are checked finite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention as kattn
from kernels import bench
from kernels import quant as kquant
from kernels.attention import gpu, gpu_decode
from kernels.quant import gpu as qgpu
from kernels.quant import gpu_w8a8

_LOG = None


def _emit(record: dict) -> None:
    record = {"t": round(time.time(), 1), **record}
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def _rel(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _draw(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)


PREFILL_CASES = [
    # B, T, S, N, K, H, kwargs
    (2, 256, 256, 4, 4, 128, dict(causal=True)),
    (2, 256, 256, 4, 4, 128, dict(causal=False)),
    (1, 200, 333, 8, 2, 64, dict(causal=True)),
    (1, 256, 256, 8, 1, 256, dict(causal=True)),
    (2, 384, 384, 4, 2, 128, dict(causal=True, sliding_window=100)),
    (2, 320, 320, 4, 4, 128, dict(causal=True, lengths=(200, 320))),
    (1, 256, 256, 4, 4, 128, dict(causal=True, softcap=20.0)),
    (2, 1000, 1000, 8, 2, 128, dict(causal=True, ws=True)),
    (1, 300, 777, 4, 4, 128, dict(causal=False, ws=True)),
    (2, 640, 640, 4, 1, 64, dict(causal=True, sliding_window=200, ws=True)),
    (2, 512, 512, 4, 4, 128, dict(causal=True, lengths=(300, 0), softcap=10.0, ws=True)),
]
DECODE_CASES = [
    # B, S, N, K, H, kwargs
    (4, 1000, 8, 2, 128, dict()),
    (2, 4096, 32, 8, 128, dict()),
    (3, 777, 8, 1, 64, dict(sliding_window=300)),
    (2, 512, 4, 4, 256, dict(softcap=30.0)),
    (40, 520, 8, 4, 128, dict()),  # B * K >= 132: one partition, normalised in the kernel
]


def check_correct(dtype=jnp.bfloat16, select: str = "") -> None:
    """Every case, or those whose description contains one of the ``|``-separated texts."""
    rng = np.random.default_rng(int(time.time()))
    for B, T, S, N, K, H, kw in PREFILL_CASES:
        if not any(t in repr((B, T, S, N, K, H, kw)) for t in select.split("|")):
            continue
        record = {"step": "correct", "kernel": "flash_fwd", "shape": [B, T, S, N, K, H], **kw}
        try:
            q, k, v = (
                _draw(rng, (B, T, N, H), dtype),
                *(_draw(rng, (B, S, K, H), dtype) for _ in range(2)),
            )
            kw = dict(kw)
            if "lengths" in kw:
                kw["lengths"] = jnp.asarray(kw["lengths"], jnp.int32)
            if kw.pop("ws", False):
                bs = gpu.BlockSizes(block_q=64, block_kv=128, num_stages=2, compute_warpgroups=2)
                out = gpu.flash_attention(q, k, v, block_sizes=bs, **kw)
            else:
                out = kattn.attention(q, k, v, impl="pallas_gpu", **kw)
            ref = kattn.attention(
                *(x.astype(jnp.float32) for x in (q, k, v)), impl="reference", **kw
            )
            record["rel_err"] = _rel(out.astype(jnp.float32), ref)
        except Exception as e:
            record.update(_failure(e))
        _emit(record)
    for T, S, starts, lengths in [(16, 2048, (0, 700, 2000), (16, 716, 2016))]:
        if not any(t in f"cached {T} {S}" for t in select.split("|")):
            continue
        record = {"step": "correct", "kernel": "cached", "shape": [T, S], "starts": starts}
        try:
            q = _draw(rng, (3, T, 32, 128), dtype)
            k, v = (_draw(rng, (3, S, 8, 128), dtype) for _ in range(2))
            args = (q, k, v, jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.int32))
            out = kattn.cached_attention(*args, impl="pallas_gpu")
            f32 = [x.astype(jnp.float32) for x in args[:3]]
            ref = kattn.cached_attention(*f32, *args[3:], impl="reference")
            record["rel_err"] = _rel(out.astype(jnp.float32), ref)
        except Exception as e:
            record.update(_failure(e))
        _emit(record)
    for B, S, N, K, H, kw in DECODE_CASES:
        if not any(t in repr((B, S, N, K, H, kw)) for t in select.split("|")):
            continue
        record = {"step": "correct", "kernel": "decode", "shape": [B, S, N, K, H], **kw}
        try:
            q = _draw(rng, (B, N, H), dtype)
            k, v = (_draw(rng, (B, S, K, H), dtype) for _ in range(2))
            lengths = jnp.asarray(rng.integers(1, S + 1, (B,)), jnp.int32)
            out = kattn.decode_attention(q, k, v, lengths, impl="pallas_gpu", **kw)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            ref = kattn.decode_attention(*f32, lengths, impl="reference", **kw)
            record["rel_err"] = _rel(out.astype(jnp.float32), ref)
        except Exception as e:
            record.update(_failure(e))
        _emit(record)


def _time(fn, args, repeats=10):
    return bench.time_call(fn, args, repeats=repeats, warmup=2)


def _failure(e: Exception, keep: int = 3000) -> dict:
    return {"error": bench._reason(e), "trace": traceback.format_exc()[-keep:]}


def _sweep(step, variants, baseline, args, build, describe, work, unit, base_name="jax_cudnn"):
    """Times ``build(variant)`` on ``args`` per variant; ``None`` times the ``baseline``
    (listed twice in each sweep, first and midway, to show the drift)."""
    for variant in variants:
        if variant is None:
            s = _time(baseline, args)
            _emit({"step": step, "impl": base_name, "seconds": s, unit: work / s / 1e12})
            continue
        record = {"step": step, "impl": "kestrel_pallas_gpu", **describe(variant)}
        try:
            s = _time(build(variant), args)
            record.update({"seconds": s, unit: work / s / 1e12})
        except Exception as e:
            record.update(_failure(e, 2000))
        _emit(record)


def sweep_prefill(dtype=jnp.bfloat16) -> None:
    shape = bench.SHAPES["prefill"]
    q, k, v = bench._inputs(shape, dtype)

    def build(variant):
        bq, bk, st, wgs, skip, in_place = variant
        gpu.SKIP_INTERIOR_MASKS, gpu.ACCUMULATE_IN_PLACE = skip, in_place
        jax.clear_caches()
        bs = gpu.BlockSizes(block_q=bq, block_kv=bk, num_stages=st, compute_warpgroups=wgs)
        return jax.jit(lambda q, k, v: gpu.flash_attention(q, k, v, block_sizes=bs))

    def describe(variant):
        return {"block": variant[:4], "skip_interior_masks": variant[4], "in_place": variant[5]}

    # (block_q, block_kv, num_stages, compute_warpgroups, skip interior masks, in-place P V)
    variants = [None, (64, 128, 3, 2, True, True), (64, 128, 3, 2, True, False),
                (64, 128, 2, 2, True, True), (64, 64, 2, 1, True, True), None,
                (64, 128, 3, 2, True, True), (64, 128, 3, 2, True, False)]  # fmt: skip
    cudnn = bench.PREFILL_IMPLS["jax_cudnn"](shape, q, k, v).fn
    work = bench._work(shape, "fwd", 2)["flops"]
    try:
        _sweep("sweep_prefill", variants, cudnn, (q, k, v), build, describe, work, "tflop_per_s")
    finally:
        gpu.SKIP_INTERIOR_MASKS = gpu.ACCUMULATE_IN_PLACE = True
        jax.clear_caches()


def sweep_decode(dtype=jnp.bfloat16) -> None:
    shape = bench.SHAPES["decode"]
    q, k, v, lengths = bench._inputs(shape, dtype)

    def build(variant):
        blocks = gpu_decode.DecodeBlockSizes(*variant)
        return jax.jit(lambda *a: gpu_decode.decode_attention(*a, block_sizes=blocks))

    # (block_s, num_partitions, num_stages)
    variants = [None, (128, 1, 2), (64, 1, 3), (64, 1, 2), (128, 2, 2), None, (128, 1, 2),
                (64, 1, 3), (64, 2, 3)]  # fmt: skip
    cudnn = bench.DECODE_IMPLS["jax_cudnn"](shape, q, k, v, lengths).fn
    nbytes = bench._work(shape, "fwd", 2)["bytes"]
    describe = lambda variant: {"block": list(variant)}
    _sweep("sweep_decode", variants, cudnn, (q, k, v, lengths), build, describe, nbytes, "tb_per_s")


BWD_CASES = [
    # B, T, S, N, K, H, kwargs
    (2, 256, 256, 4, 4, 128, dict(causal=True)),
    (1, 300, 700, 8, 2, 128, dict(causal=True, lengths=(650,))),
    (2, 384, 384, 4, 1, 64, dict(causal=True, sliding_window=100, softcap=20.0)),
    (1, 256, 256, 4, 4, 128, dict(causal=False)),
]


def _grads(impl, kw, do, q, k, v):
    loss = lambda q, k, v: jnp.sum(
        kattn.attention(q, k, v, impl=impl, **kw).astype(jnp.float32) * do
    )
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_backward(dtype=jnp.bfloat16) -> None:
    """Gradients of ``attention(impl="pallas_gpu")`` against the float32 reference's."""
    rng = np.random.default_rng(int(time.time()) + 1)
    for B, T, S, N, K, H, kw in BWD_CASES:
        record = {"step": "correct_bwd", "shape": [B, T, S, N, K, H], **kw}
        try:
            q = _draw(rng, (B, T, N, H), dtype)
            k, v = (_draw(rng, (B, S, K, H), dtype) for _ in range(2))
            do = _draw(rng, (B, T, N, H), jnp.float32)
            kw = dict(kw)
            if "lengths" in kw:
                kw["lengths"] = jnp.asarray(kw["lengths"], jnp.int32)
            got = _grads("pallas_gpu", kw, do, q, k, v)
            want = _grads("reference", kw, do, *(x.astype(jnp.float32) for x in (q, k, v)))
            for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
                record[f"rel_err_{name}"] = _rel(g.astype(jnp.float32), w)
        except Exception as e:
            record.update(_failure(e))
        _emit(record)


def sweep_backward(dtype=jnp.bfloat16) -> None:
    """Forward + backward (as ``kernels.bench --backward`` times it) per backward tiling."""
    from kernels.attention import gpu_bwd

    shape = bench.SHAPES["prefill"]
    q, k, v = bench._inputs(shape, dtype)
    work = bench._work(shape, "bwd", 2)["flops"]
    cudnn = bench._grad_of(bench.PREFILL_IMPLS["jax_cudnn"](shape, q, k, v).fn)
    kv_len = jnp.full((shape.B,), shape.S, jnp.int32)

    def fwd_bwd(bs):
        cfg = gpu._config(q, shape.S, True, None, None, None, None, False)

        def fn(q, k, v):
            out, lse = gpu._forward(q, k, v, kv_len, cfg, with_lse=True)
            do = jnp.ones_like(out)
            return gpu_bwd.backward(q, k, v, kv_len, out, lse, do, cfg, block_sizes=bs)

        return jax.jit(fn)

    variants = [None, (64, 64, 2), (64, 64, 3), (64, 128, 2), None, (64, 64, 2)]
    build = lambda variant: fwd_bwd(gpu_bwd.BwdBlockSizes(*variant))
    describe = lambda variant: {"block": list(variant)}
    _sweep("sweep_bwd", variants, cudnn, (q, k, v), build, describe, work, "tflop_per_s")


_PREFILL_IMPLS = {"jax_cudnn", "kestrel_pallas_gpu", "kestrel_xla", "jax_pallas_triton_mha",
                  "jax_pallas_mgpu", "kestrel_cudnn", "tokamax"}  # fmt: skip
_BWD_IMPLS = {"jax_cudnn", "kestrel_pallas_gpu"}


def run_bench(backward_only: bool = False) -> None:
    for phase in ("prefill",) if backward_only else ("prefill", "decode"):
        bench.bench_attention_shape(
            bench.SHAPES[phase],
            dtype=jnp.dtype(jnp.bfloat16),
            passes=["bwd"] if backward_only else ["fwd", "bwd"] if phase == "prefill" else ["fwd"],
            impls=None if phase == "decode" else _BWD_IMPLS if backward_only else _PREFILL_IMPLS,
            repeats=10,
            warmup=2,
            emit=lambda r: _emit({"step": "bench", **r}),
        )


QUANT_CASES = [
    # M, K, N, scheme, group_size, activations
    (16, 8192, 4096, "int8", None, None),
    (16, 8192, 4096, "int4", 128, None),
    (16, 4096, 4096, "int4", None, None),
    (16, 8192, 4096, "fp8", None, None),
    (5, 1152, 700, "int8", 128, None),
    (1024, 2048, 1024, "int8", None, None),
    (300, 1024, 640, "int8", None, "int8"),
    (300, 1024, 640, "fp8", None, "fp8"),
    (16, 8192, 4096, "int8", None, "int8"),
]


def check_quant(dtype=jnp.bfloat16) -> None:
    """``kernels.quant.matmul(impl="pallas_gpu")`` against the float32 reference."""
    rng = np.random.default_rng(int(time.time()))
    for M, K, N, scheme, group_size, activations in QUANT_CASES:
        record = {"step": "quant_correct", "shape": [M, K, N], "scheme": scheme,
                  "group_size": group_size, "activations": activations}  # fmt: skip
        try:
            x = _draw(rng, (M, K), dtype)
            qw = kquant.quantize(_draw(rng, (K, N), jnp.float32), scheme, group_size=group_size)
            out = kquant.matmul(x, qw, activations=activations, impl="pallas_gpu")
            ref = kquant.matmul(
                x.astype(jnp.float32), qw, activations=activations, impl="reference"
            )
            record["rel_err"] = _rel(out.astype(jnp.float32), ref)
        except Exception as e:
            record.update(_failure(e))
        _emit(record)


def sweep_quant(dtype=jnp.bfloat16) -> None:
    """Block sizes of the weight-only kernel on the decode GEMM and of the W8A8 kernel on the
    8192^3 prefill GEMM, each against the bf16 XLA matmul."""
    rng = np.random.default_rng(0)
    bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=x.dtype))
    decode = [None, (16, 128, 128, 4), (16, 128, 256, 4), (16, 256, 128, 4), (16, 64, 256, 6),
              (16, 128, 128, 8), None, (16, 128, 128, 4)]  # fmt: skip
    prefill = [None, (128, 128, 128, 4), (128, 128, 128, 3), (128, 128, 256, 3), (64, 256, 128, 4),
               (128, 64, 128, 6), None, (128, 128, 128, 4)]  # fmt: skip
    for (M, K, N), scheme, group_size, activations, variants, blocks in [
        ((16, 8192, 28672), "int8", None, None, decode, qgpu.BlockSizes),
        ((16, 8192, 28672), "int4", 128, None, decode, qgpu.BlockSizes),
        ((8192, 8192, 8192), "int8", None, "int8", prefill, gpu_w8a8.BlockSizes),
    ]:
        x = _draw(rng, (M, K), dtype)
        w = (_draw(rng, (K, N), jnp.float32) * 0.02).astype(dtype)
        qw = kquant.quantize(w, scheme, group_size=group_size)

        def build(variant, qw=qw, activations=activations, blocks=blocks):
            bs = blocks(*variant)
            fn = jax.jit(lambda a: qgpu.matmul(a, qw, activations=activations, block_sizes=bs))
            return lambda a, _: fn(a)

        describe = lambda v, scheme=scheme, a=activations: {"scheme": scheme, "activations": a,
                                                            "block": list(v)}  # fmt: skip
        decoding = activations is None
        work, unit = (qw.nbytes, "tb_per_s") if decoding else (2 * M * K * N, "tflop_per_s")
        step = "sweep_quant_" + ("decode" if decoding else "prefill")
        _sweep(step, variants, bf16, (x, w), build, describe, work, unit, "jax_bf16")


def run_quant_bench() -> None:
    for case in bench.QUANT_CASES:
        bench.bench_quant_case(
            case, dtype=jnp.dtype(jnp.bfloat16), impls=None, repeats=10, warmup=2,
            emit=lambda r: _emit({"step": "quant_bench", **r}),
        )  # fmt: skip


def run_scan_bench() -> None:
    """``kernels.bench scan`` (Mamba-2 1.3B shape): every impl against the naive float32
    recurrence, forward and forward+backward."""
    for case in bench.SCAN_CASES:
        bench.bench_scan_case(
            case, dtype=jnp.dtype(jnp.bfloat16), passes=("fwd", "bwd"), impls=None, repeats=10,
            warmup=2, emit=lambda r: _emit({"step": "scan_bench", **r}),
        )  # fmt: skip


def run_gmm_bench() -> None:
    """``kernels.bench grouped_matmul`` (Mixtral and fine-grained MoE shapes) against
    ``jax.lax.ragged_dot`` and the padded dense baseline, forward and backward."""
    for case in bench.GMM_CASES:
        bench.bench_gmm_case(
            case, dtype=jnp.dtype(jnp.bfloat16), passes=("fwd", "bwd"), impls=None, repeats=10,
            warmup=2, emit=lambda r: _emit({"step": "gmm_bench", **r}),
        )  # fmt: skip


STEPS = {
    "correct": check_correct,
    "correct_bwd": check_backward,
    "sweep": None,
    "sweep_bwd": sweep_backward,
    "bench": run_bench,
    "quant_correct": check_quant,
    "quant_sweep": sweep_quant,
    "quant_bench": run_quant_bench,
    "scan_bench": run_scan_bench,
    "gmm_bench": run_gmm_bench,
}


def main(argv=None) -> int:
    global _LOG
    parser = argparse.ArgumentParser(prog="python -m kernels.gpucheck")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--only", default="correct,correct_bwd,sweep,sweep_bwd,bench")
    parser.add_argument("--backward-only", action="store_true", help="bench: prefill bwd only")
    parser.add_argument("--select", default="", help="correctness cases containing this text")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    _LOG = open(os.path.join(args.out, "gpucheck.jsonl"), "a")  # noqa: SIM115 (whole run)
    _emit(
        {"step": "env", "jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()]}
    )
    for step in args.only.split(","):
        t0 = time.time()
        try:
            if step == "correct":
                check_correct(select=args.select)
            elif step == "bench":
                run_bench(backward_only=args.backward_only)
            elif step == "sweep":
                sweep_prefill()
                sweep_decode()
            else:
                STEPS[step]()
        except Exception as e:
            _emit({"step": step, **_failure(e)})
        _emit({"step": step, "done_s": round(time.time() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
