"""Kestrel models: Flax NNX definitions of every efficient LM family, one layer stack.

Public surface (``../shared/API.md``): ``get_config``, ``list_configs``, ``build``,
``generate``, and ``models.hf`` for Hugging Face checkpoints.
"""

from models import hf
from models.configs import ModelConfig, RopeScaling, get_config, list_configs
from models.generate import GenerateResult, generate
from models.lm import LM, abstract, build, count_params, register_channel, register_mixer
from models.state import DecodeState, KVCache, Segment

__all__ = [
    "LM",
    "DecodeState",
    "GenerateResult",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Segment",
    "abstract",
    "build",
    "count_params",
    "generate",
    "get_config",
    "hf",
    "list_configs",
    "register_channel",
    "register_mixer",
]
