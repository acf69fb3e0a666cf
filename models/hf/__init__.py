"""Hugging Face checkpoint import/export (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE, Mamba-2,
RecurrentGemma); no torch.

    model = models.hf.load_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)
    models.hf.save_pretrained(model, "out_dir")  # AutoModelForCausalLM.from_pretrained loads it

``config_from_hf`` / ``config_to_hf`` map ``config.json`` dicts to and from ``ModelConfig``;
``models.hf.safetensors`` is the file-format reader/writer.
"""

from models.hf import safetensors
from models.hf.config import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ROPE_TYPES,
    ConversionError,
    config_from_hf,
    config_to_hf,
)
from models.hf.convert import load_pretrained, read_config, save_pretrained, tensor_map
from models.hf.safetensors import CheckpointNotFoundError, SafetensorsError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "CheckpointNotFoundError",
    "ConversionError",
    "SafetensorsError",
    "config_from_hf",
    "config_to_hf",
    "load_pretrained",
    "read_config",
    "safetensors",
    "save_pretrained",
    "tensor_map",
]
