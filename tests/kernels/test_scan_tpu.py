"""The Pallas TPU chunked scan in TPU interpret mode against the ``lax.scan`` oracle.

Forward outputs, final states and gradients in every input on the cases of ``test_scan``
(tail chunks, ``G < H``, an initial state, strong and weak decays), each compiled once at XLA
optimisation level 0; the oracle's results are shared with ``test_scan``. With a decay per key
dimension (``tpu_vector``, forward and backward kernels): chunk 40 on ``T = 45`` (sub-chunks
16 + 16 + padded 8, a tail chunk), ``G < H``, an initial state, decays to ``-20`` per token;
chunk 32 (two sub-chunks) with no initial state; chunk 8 (one sub-chunk) on ``T = 20``.
"""

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from kernels import scan
from kernels.scan import tpu
from tests.kernels.test_scan import CASES, VECTOR_CASES, assert_close, check_case, make_inputs


@pytest.mark.parametrize("name", [*CASES, *VECTOR_CASES])
def test_forward_and_gradients_match_naive(name):
    check_case(name, "pallas_tpu", interpret=True)


def _pallas_call_names(jaxpr):
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(str(eqn.params["name"]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names += _pallas_call_names(sub)
    return names


def test_vector_decay_gradients_come_from_the_backward_kernel():
    q, k, v, a, s0 = make_inputs(1, 8, 1, 1, 8, 8, vector=True)

    def loss(q, k, v, a, s0):
        o, S = tpu.chunked_scan(q, k, v, a, s0, chunk_size=8, interpret=True)
        return jnp.sum(o) + jnp.sum(S)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, a, s0)
    assert _pallas_call_names(jaxpr.jaxpr) == ["chunked_scan_vector_fwd", "chunked_scan_vector_bwd"]


def test_bfloat16_forward():
    q, k, v, a, s0 = make_inputs(1, 24, 1, 2, 16, 16, dtype="bfloat16")
    o, S = tpu.chunked_scan(q, k, v, a, s0, chunk_size=16, interpret=True)
    o_want, S_want = scan.reference.naive_scan(q, k, v, a, s0)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert_close(o, o_want, "bfloat16")
    assert_close(S, S_want, "bfloat16")


def test_hardware_chunk_size_must_fill_sublanes():
    q, k, v, a, _ = make_inputs(1, 8, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="multiple of 8 on a TPU, got 12"):
        tpu.chunked_scan(q, k, v, a, chunk_size=12)
    with pytest.raises(ValueError, match="multiple of 8 on a TPU, got 12"):
        tpu.chunked_scan(q, k, v, jnp.zeros((1, 8, 1, 8)), chunk_size=12)
    with pytest.raises(ValueError, match="pass interpret=True"):
        scan.chunked_scan(q, k, v, a, chunk_size=8, impl="pallas_tpu")
