"""Kestrel models: Flax NNX definitions of every efficient LM family, one layer stack.

Public surface (``../shared/API.md``): ``get_config``, ``list_configs``, ``build``,
``generate``, and ``models.hf`` for Hugging Face checkpoints.
"""

from models import hf
from models.configs import ModelConfig, RopeScaling, get_config, list_configs
from models.early_exit import EarlyExitOutput, exit_loss, step_to_exit
from models.generate import GenerateResult, generate
from models.linear_attention import GLA, Based, LinearAttentionState, RetNet
from models.lm import (
    LM,
    LMOutput,
    abstract,
    build,
    count_active_params,
    count_params,
    register_channel,
    register_mixer,
)
from models.moe import MoE
from models.prune import PruneReport, block_influence, drop_layers, prune, pruned_config
from models.quantize import (
    QuantizedEinsum,
    QuantRecipe,
    calibrate,
    layer_bytes,
    load_quantized,
    param_bytes,
    quantize,
    save_quantized,
)
from models.ssm import Mamba2, SSMState
from models.state import DecodeState, KVCache, Segment
from models.upcycle import upcycle

__all__ = [
    "LM",
    "Based",
    "DecodeState",
    "EarlyExitOutput",
    "GenerateResult",
    "GLA",
    "KVCache",
    "LMOutput",
    "LinearAttentionState",
    "ModelConfig",
    "Mamba2",
    "MoE",
    "PruneReport",
    "QuantRecipe",
    "QuantizedEinsum",
    "RetNet",
    "RopeScaling",
    "SSMState",
    "Segment",
    "abstract",
    "block_influence",
    "build",
    "calibrate",
    "count_active_params",
    "count_params",
    "drop_layers",
    "exit_loss",
    "generate",
    "get_config",
    "hf",
    "layer_bytes",
    "list_configs",
    "load_quantized",
    "param_bytes",
    "prune",
    "pruned_config",
    "quantize",
    "register_channel",
    "register_mixer",
    "save_quantized",
    "step_to_exit",
    "upcycle",
]
