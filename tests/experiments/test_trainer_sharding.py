"""The trainer's weight layouts: tensor- and FSDP-parallel runs match data-parallel training."""

import numpy as np
import pytest

from experiments import trainer
from experiments.data import DataConfig


def _run(tmp_path, name, **kwargs):
    cfg = trainer.TrainConfig(
        model="dense-tiny",
        data=DataConfig(kind="stdlib", seq_len=32, batch_size=8, max_bytes=200_000),
        steps=4,
        warmup_steps=1,
        eval_every=4,
        eval_batches=1,
        checkpoint_every=4,
        log_every=1,
        **kwargs,
    )
    result = trainer.train(cfg, tmp_path / name, progress=False)
    return np.array([r["loss"] for r in result["history"]["train"]]), tmp_path / name


@pytest.mark.slow
def test_tensor_and_fsdp_parallel_match_data_parallel(tmp_path):
    base, _ = _run(tmp_path, "dp")
    tp, tp_dir = _run(tmp_path, "tp", sharding="tensor_parallel", model_parallel=4)
    fsdp_tp, _ = _run(tmp_path, "fsdp_tp", sharding="fsdp_tp", model_parallel=2)
    assert len(base) == 4
    np.testing.assert_allclose(tp, base, rtol=1e-4)
    np.testing.assert_allclose(fsdp_tp, base, rtol=1e-4)
    report = (tp_dir / trainer.SHARDING_REPORT_FILE).read_text()
    q_row = next(line for line in report.splitlines() if "blocks.0.mixer.q.kernel" in line)
    assert "'model'" in q_row and q_row.split()[-1] == f"{64 * 4 * 16 * 4 // 4:,}"


def test_unknown_sharding_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown rules preset 'zero3'; valid:"):
        trainer.TrainConfig(
            data=DataConfig(kind="stdlib", seq_len=8, batch_size=2), sharding="zero3"
        )
