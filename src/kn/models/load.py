"""Load any Hugging Face masked or causal LM (by id or local directory) with clear failures.

The checkpoint's ``config.model_type`` decides its kind through its adapter
(kn.models.adapters.is_causal_type), before any weight is read: masked LMs load with
AutoModelForMaskedLM, causal LMs with AutoModelForCausalLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kn.models.adapters import adapter_for, is_causal_type


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says how to provide it.

    A ValueError (a bad model.path / device value) so stage CLIs report it in one line.
    """


def _looks_local(spec: str) -> bool:
    """A path rather than a Hub id ("org/name" has exactly one slash and no leading ./ or /)."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_lm(
    spec: str | Path,
    device: torch.device | str = "cpu",
    layer_norm_eps: float | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer in eval mode, fp32, on ``device``: a masked or a causal LM, as its architecture is.

    ``layer_norm_eps`` overrides every LayerNorm's epsilon (the authors' BERT used 1e-5,
    SPEC §1). Unsupported architectures fail here, before any weight is loaded.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if _looks_local(spec) or path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {spec!r} does not exist or is not a directory; set model.path to a directory written "
                "by save_pretrained() (config.json, weights, tokenizer files) or to a Hugging Face id"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {spec!r} has no config.json; save the model with save_pretrained()")
    kwargs: dict[str, Any] = {}
    if layer_norm_eps is not None:
        kwargs["layer_norm_eps"] = layer_norm_eps
    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    causal = is_causal_type(str(config.model_type))  # unsupported architectures fail here, before the weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model, info = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(
            spec, dtype=torch.float32, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    head_missing = [k for k in info.get("missing_keys", []) if not _is_tied_decoder(k) and _is_head_key(k)]
    if head_missing:
        kind, classes = ("causal-LM", "*ForCausalLM") if causal else ("masked-LM", "*ForMaskedLM / *ForPreTraining")
        raise ModelLoadError(
            f"{spec!r} has no trained {kind} head (missing {head_missing[:3]}...); "
            f"knowledge neurons need a checkpoint saved from a {classes} model"
        )
    adapter_for(model)
    if layer_norm_eps is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = layer_norm_eps
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def _load_error(spec: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load language model {spec!r}: {exc}\n"
        "Provide the weights in one of these ways: (1) a local directory holding config.json, the "
        "weights and the tokenizer: model.path=/path/to/dir; (2) a Hugging Face cache that already "
        "holds the model (HF_HOME / HF_HUB_CACHE), with HF_HUB_OFFLINE=1 on offline machines; "
        "(3) network access to the Hub with HF_HUB_OFFLINE unset."
    )


load_masked_lm = load_lm  # the name callers used before causal LMs were supported


def _is_head_key(key: str) -> bool:
    return key.startswith(("cls.", "lm_head.", "vocab_", "generator_lm_head", "generator_predictions", "embed_out."))


def _is_tied_decoder(key: str) -> bool:
    """Decoders tied to the input embeddings are legitimately absent from checkpoints."""
    return key.endswith("decoder.weight") or key == "lm_head.decoder.weight" or key.endswith("vocab_projector.weight")
