"""The Pallas TPU chunked scan in TPU interpret mode against the ``lax.scan`` oracle.

Forward outputs, final states and gradients in every input on the cases of ``test_scan``
(tail chunks, ``G < H``, an initial state, strong and weak decays), each compiled once at XLA
optimisation level 0; the oracle's results are shared with ``test_scan``. With a decay per key
dimension (``tpu_vector``, forward kernel; gradients through the jnp form's VJP): chunk 40 on
``T = 45`` (sub-chunks 16 + 16 + padded 8, a tail chunk), ``G < H``, an initial state, decays
to ``-20`` per token.
"""

import jax.numpy as jnp
import pytest

from kernels import scan
from kernels.scan import tpu
from tests.kernels.test_scan import CASES, assert_close, check_case, make_inputs


@pytest.mark.parametrize("name", [*CASES, "vector_tail_chunk_gqa"])
def test_forward_and_gradients_match_naive(name):
    check_case(name, "pallas_tpu", interpret=True)


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
