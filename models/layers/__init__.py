"""Building blocks shared by every model family: linear maps, norms, embeddings, RoPE."""

from models.layers.embeddings import Embed
from models.layers.linear import Einsum, param
from models.layers.norms import LayerNorm, RMSNorm, RMSNormPlusOne, make_norm
from models.layers.rope import apply_rope, rope_frequencies

__all__ = [
    "Einsum",
    "Embed",
    "LayerNorm",
    "RMSNorm",
    "RMSNormPlusOne",
    "apply_rope",
    "make_norm",
    "param",
    "rope_frequencies",
]
