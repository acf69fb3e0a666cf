"""``python -m kernels.bench grouped_matmul``: MoE grouped matmuls (``kernels.moe``) against
``jax.lax.ragged_dot``, a dense padded einsum and JAX's megablox, in the same process.

    python -m kernels.bench grouped_matmul [--small] [--backward] [--impls ...]

Records: the ``GmmCase`` fields, ``pass``, ``impl``, ``dtype``, ``device``, ``backend``,
``jax``, ``seconds``, ``flops`` (``2·M·K·N``, 3x for ``bwd``), ``tflop_per_s``,
``rel_err_vs_reference`` (forward) and ``vs_ragged_dot`` (``seconds(jax_ragged_dot) / seconds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable, Sequence

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
