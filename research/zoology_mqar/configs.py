"""Run configs of the Zoology MQAR recall-vs-state study (arXiv:2312.04927, Figure 2, §3-4).

    python -m research.zoology_mqar.run --workdir runs/zoology_mqar            # full study
    python -m research.zoology_mqar.run --smoke --workdir runs/zoology_mqar_smoke

``get_config("")`` is the full study (5 families x 2 widths x 2 tasks, under 30 minutes on a
2-core CPU), ``get_config("smoke")`` the end-to-end check (one width, two short tasks, a few
steps; under 2 minutes). Families whose preset or mixer is not in ``models`` yet are skipped
by the runner, not an error.
"""

from __future__ import annotations

import dataclasses
import math

import models
from models import lm

# Model-dimension-independent head size of the width sweep (dense-tiny's: 64 / 4 heads).
HEAD_DIM = 16


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family of the study.

    Attributes:
      name: the family's label in tables and plots.
      preset: a ``models.get_config`` preset whose shape is scaled to each width.
      layer_choices: layer counts the param matcher may pick from (the one whose
        non-embedding parameter count is nearest attention's at the same width).
      paper: what the family stands for in Zoology.
    """

    name: str
    preset: str
    layer_choices: tuple[int, ...]
    paper: str


# Attention first: the other families are matched to its parameter count.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("attention", "dense-tiny", (2,), "Attention (Llama-style GQA, SwiGLU MLP)"),
        # A Mamba block has no MLP: two of them per attention+MLP layer (Mamba, arXiv:2312.00752
        # §4.2), which the matcher finds by itself.
        Family("mamba2", "mamba2-tiny", (2, 4), "Mamba (here Mamba-2 / SSD)"),
        Family("based", "based-tiny", (2, 4), "Based (Taylor linear attention + short conv)"),
        Family("gla", "gla-tiny", (2, 4), "Gated linear attention (RWKV/GLA-style gating)"),
        Family("retnet", "retnet-tiny", (2, 4), "RetNet (fixed-decay linear attention)"),
    )
}


@dataclasses.dataclass(frozen=True)
class Task:
    """An MQAR task: sequences of ``seq_len`` tokens holding ``num_kv_pairs`` pairs."""

    seq_len: int
    num_kv_pairs: int

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_P{self.num_kv_pairs}"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The sweep: every family x width x task, one training run each.

    Attributes:
      families: names in ``FAMILIES``.
      widths: model dimensions ``d_model``.
      tasks: MQAR (sequence length, key-value pairs) settings each model is scored on.
      train_tasks: the mixture each model trains on, one task per step in turn (Zoology
        trains one model on several sequence lengths), after a curriculum.
      curriculum_steps: the first steps train on ``train_tasks[0]`` only. Attention forms its
        induction (lookup) mechanism within a few hundred steps on short sequences and then
        carries it to the longer ones; trained on the mixture from step 0 it stayed near 10-20%
        for 400-1,200 steps on this CPU budget.
      vocab_size: token ids; keys from ``[1, V/2)``, values from ``[V/2, V)``.
      batch_size, steps, warmup_steps, weight_decay: training (``experiments.trainer``).
      lrs: peak learning rate per family (``default_lr`` for families not listed).
      eval_batches: held-out batches scored at the end (``eval_batches * batch_size``
        sequences, ``num_kv_pairs`` queries each).
      seed: initialisation and data seed.
      smoke: the quick variant.
    """

    families: tuple[str, ...] = tuple(FAMILIES)
    widths: tuple[int, ...] = (64, 96)
    tasks: tuple[Task, ...] = (Task(32, 4), Task(64, 8))
    train_tasks: tuple[Task, ...] = (Task(32, 4), Task(64, 8))
    curriculum_steps: int = 300
    vocab_size: int = 128
    batch_size: int = 64
    steps: int = 600
    warmup_steps: int = 60
    weight_decay: float = 0.0
    # Attention, d=64, this schedule: at 1e-2 it stalled at 24% (T=32, 4 pairs), at 3e-3 it
    # had not formed its lookup by step 400 (35%), at 1.5e-3 it had by step 300 (96%).
    lrs: tuple[tuple[str, float], ...] = (("attention", 1.5e-3),)
    default_lr: float = 3e-3
    eval_batches: int = 8
    seed: int = 0
    smoke: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; valid: {list(FAMILIES)}")
        for w in self.widths:
            if w < HEAD_DIM or w % HEAD_DIM:
                raise ValueError(f"width {w} must be a positive multiple of {HEAD_DIM}")
        if not 0 <= self.curriculum_steps <= self.steps:
            raise ValueError(f"curriculum_steps {self.curriculum_steps} not in [0, {self.steps}]")
        unknown = sorted(set(dict(self.lrs)) - set(FAMILIES))
        if unknown:
            raise ValueError(f"lrs for unknown families {unknown}; valid: {list(FAMILIES)}")

    def lr(self, family: str) -> float:
        return dict(self.lrs).get(family, self.default_lr)


def get_config(arg: str = "") -> StudyConfig:
    """The study; ``arg="smoke"`` for the quick CPU variant."""
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown zoology_mqar arg {arg!r}; valid: '', 'smoke'")
    if arg == "smoke":
        return StudyConfig(
            widths=(16,),
            tasks=(Task(16, 2), Task(32, 4)),
            train_tasks=(Task(16, 2),),  # one train shape: compiling dominates the smoke
            curriculum_steps=2,
            vocab_size=32,
            batch_size=8,
            steps=4,
            warmup_steps=1,
            eval_batches=1,
            smoke=True,
        )
    return StudyConfig()


def available(family: Family) -> str | None:
    """``None`` if ``models`` has the family's preset and mixers, else why it is skipped."""
    if family.preset not in models.list_configs():
        return f"preset {family.preset!r} not in models.list_configs()"
    missing = sorted(set(models.get_config(family.preset).mixer_pattern) - set(lm.MIXERS))
    if missing:
        return f"mixers {missing} not registered in models.lm.MIXERS"
    return None


def scaled(preset: models.ModelConfig, width: int, num_layers: int, vocab_size: int):
    """``preset`` at model dimension ``width``: heads of ``HEAD_DIM`` (kv heads in the preset's
    ratio), MLP, recurrent widths and linear-attention heads scaled with ``d_model``, the
    preset's other shapes (per-head key/value/state sizes, windows) kept."""
    ratio = width / preset.d_model
    heads = width // HEAD_DIM
    overrides = dict(
        d_model=width,
        num_layers=num_layers,
        vocab_size=vocab_size,
        num_heads=heads,
        num_kv_heads=max(1, heads * preset.num_kv_heads // preset.num_heads),
        head_dim=HEAD_DIM,
        ffn_dim=max(1, round(preset.ffn_dim * ratio)),
    )
    if preset.lru_width is not None:
        overrides["lru_width"] = round(preset.lru_width * ratio)
    if getattr(preset, "linear_attn_heads", None) is not None:
        # Per-head key/value sizes stay: the [N, K, V] state grows with the width, as in Zoology.
        overrides["linear_attn_heads"] = max(1, round(preset.linear_attn_heads * ratio))
    if "mamba2" in preset.mixer_pattern:
        heads = preset.ssm_expand * width // preset.ssm_head_dim
        overrides["ssm_groups"] = math.gcd(preset.ssm_groups, heads)
    return preset.replace(**overrides)


def embedding_params(cfg: models.ModelConfig) -> int:
    """Token embedding plus (if untied) output head parameters."""
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def model_config(family: Family, width: int, vocab_size: int) -> models.ModelConfig:
    """The family at ``width``, with the layer count whose non-embedding parameters come
    nearest attention's at the same width (a log-ratio distance)."""
    preset = models.get_config(family.preset)
    candidates = [scaled(preset, width, n, vocab_size) for n in family.layer_choices]
    if family.name == "attention" or len(candidates) == 1:
        return candidates[0]
    ref = FAMILIES["attention"]
    ref_cfg = scaled(models.get_config(ref.preset), width, ref.layer_choices[0], vocab_size)
    target = models.count_params(ref_cfg) - embedding_params(ref_cfg)

    def distance(cfg):
        return abs(math.log((models.count_params(cfg) - embedding_params(cfg)) / target))

    return min(candidates, key=distance)
