"""Masked-LM loading, the per-architecture FFN map, and prompt encoding."""

from kn.models.arch import FFNLayout, ffn_activation_modules, ffn_layout, num_ffn_layers, value_projections
from kn.models.encoding import EncodedPrompts, encode_prompts, object_token_id
from kn.models.load import ModelLoadError, load_masked_lm, model_location, resolve_device

__all__ = [
    "EncodedPrompts",
    "FFNLayout",
    "ModelLoadError",
    "encode_prompts",
    "ffn_activation_modules",
    "ffn_layout",
    "load_masked_lm",
    "model_location",
    "num_ffn_layers",
    "object_token_id",
    "resolve_device",
    "value_projections",
]
