"""``models.generate(..., prefill_chunk=c)``: prefilling in pieces gives the same tokens as one
prefill call, for attention, recurrent, ring-buffer and MoE stacks, with ragged prompts whose
last tokens fall in different pieces."""

import numpy as np
import pytest

import models

PROMPTS = [list(range(3, 8)), list(range(10, 47)), list(range(50, 70))]  # 5, 37, 20 tokens


@pytest.mark.parametrize("name", ["dense-tiny", "griffin-tiny"])
def test_chunked_prefill_generates_the_same_tokens(name):
    model = models.build(models.get_config(name), seed=0)
    want = models.generate(model, PROMPTS, max_new_tokens=6)
    got = models.generate(model, PROMPTS, max_new_tokens=6, prefill_chunk=8)
    assert got.tokens == want.tokens
    assert np.all(np.array([len(t) for t in got.tokens]) == 6)


def test_bad_prefill_chunk_is_refused():
    model = models.build(models.get_config("dense-tiny"))
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        models.generate(model, PROMPTS, max_new_tokens=2, prefill_chunk=0)
