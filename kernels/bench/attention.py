"""``python -m kernels.bench attention``: Kestrel's attention against the baselines JAX ships.

    python -m kernels.bench attention                        # BASELINES.md shapes, forward
    python -m kernels.bench attention --shapes prefill --backward --repeats 20
    python -m kernels.bench attention --impls kestrel_xla,jax_cudnn,jax_pallas_mgpu
    python -m kernels.bench attention --small                # tiny shapes, seconds on CPU

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
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels import attention as kattn
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


def _grad_of(fn: Callable) -> Callable:
    loss = lambda *args: jnp.sum(fn(*args).astype(jnp.float32))
    return jax.jit(lambda q, k, v, *rest: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, *rest))


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
