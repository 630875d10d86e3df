"""Models: loading, one adapter per architecture, prompt encoding, the batched forward pass, training."""

from kn.models.adapters import Adapter, adapter_for, model_device, supported_architectures
from kn.models.encoding import EncodedPrompts, encode_prompts, object_token_id
from kn.models.load import ModelLoadError, load_lm, load_masked_lm

__all__ = [
    "Adapter",
    "EncodedPrompts",
    "ModelLoadError",
    "adapter_for",
    "encode_prompts",
    "load_lm",
    "load_masked_lm",
    "model_device",
    "object_token_id",
    "supported_architectures",
]
