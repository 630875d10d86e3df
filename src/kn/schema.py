"""Typed schema of the config: wrong types and unknown keys fail with the key's name.

Hydra already rejects overrides of unknown keys; this adds type checks on every value
(including those set in YAML files) by merging the composed config into dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class TrainConfig:
    seed: int = 0
    num_layers: int = 6
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_heads: int = 4
    dropout: float = 0.1
    max_steps: int = 3000
    target_accuracy: Optional[float] = None
    eval_every: int = 250
    batch_size: int = 64
    lr: float = 7e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    other_mask_prob: float = 0.15
    heldout_templates: int = 1
    heldout_min_templates: int = 5
    vocab_size: int = 8000


@dataclass
class ModelConfig:
    name: str = "???"
    source: str = "trained"
    path: Optional[str] = None
    layer_norm_eps: Optional[float] = None
    train: Optional[TrainConfig] = None


@dataclass
class DataConfig:
    resources_dir: str = "resources/pararel"
    relations: Any = "all"
    max_facts_per_relation: Optional[int] = None


@dataclass
class StudyConfig:
    facts_per_relation: Optional[int] = None


@dataclass
class IGConfig:
    m: int = 20
    alpha_rule: str = "left"
    target: str = "gold"
    storage_ratio: float = 0.1
    facts_per_shard: int = 4
    batch_size: int = 64
    dtype: str = "float32"
    device: str = "auto"


@dataclass
class RefineConfig:
    t: float = 0.2
    t_base: float = 0.5
    p: float = 0.7
    p_step: float = 0.05
    max_evals: int = 6
    target_min: float = 2.0
    target_max: float = 5.0
    min_prompts: int = 3
    relation_share: float = 0.1


@dataclass
class EvaluateConfig:
    suppress_factor: float = 0.0
    amplify_factor: float = 2.0
    random_control: bool = True
    dose_max_k: int = 300
    dose_ks: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10, 20, 50, 100, 200, 300])
    bootstrap: int = 1000
    inter_draws: int = 100
    batch_size: int = 64
    device: str = "auto"


@dataclass
class EditConfig:
    edits_per_relation: int = 10
    max_attempts: int = 10000
    lambda1: int = 1
    lambda2: int = 8
    ppl_facts: int = 5
    success_k: int = 5
    random_baseline: bool = True
    kn_filter: str = "code"
    batch_size: int = 64


@dataclass
class EraseConfig:
    relations: list[str] = field(default_factory=lambda: ["P19", "P27", "P106", "P937"])
    top_k: int = 20
    value: str = "zero"
    batch_size: int = 64


@dataclass
class DistantConfig:
    resources_dir: str = "resources/bing_distant"
    max_len: int = 512
    max_mask_word: int = 50
    head_redraws: int = 4
    trigger_relations: list[str] = field(default_factory=lambda: ["P740", "P937"])
    trigger_lines: int = 20


@dataclass
class SweepConfig:
    """Model-organism sweep (experiment=organism-sweep); empty variants = no sweep."""

    variants: dict[str, Any] = field(default_factory=dict)
    facts_per_relation: Optional[int] = None


@dataclass
class KNConfig:
    seed: int = 42
    results_dir: str = "results"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    distant: DistantConfig = field(default_factory=DistantConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


_CHOICES = {
    "model.source": {"trained", "pretrained"},
    "ig.alpha_rule": {"left", "right", "midpoint"},
    "ig.target": {"gold", "pred"},
    "ig.dtype": {"float32", "bfloat16"},
    "ig.device": {"auto", "cpu", "cuda"},
    "evaluate.device": {"auto", "cpu", "cuda"},
    "erase.value": {"zero", "unk"},
    "edit.kn_filter": {"code", "paper"},
}


def validate_config(cfg: DictConfig) -> None:
    """Raise ``kn.config.ConfigError`` naming the first bad key (type, unknown key, choice, range)."""
    from kn.config import ConfigError

    schema = OmegaConf.structured(KNConfig)
    try:
        OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}") from exc
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r}; expected one of {sorted(allowed)}")
    if cfg.model.source == "trained" and cfg.model.train is None:
        raise ConfigError("config key 'model.train' is null but model.source is 'trained'")
    if cfg.model.source == "pretrained" and not cfg.model.path:
        raise ConfigError("config key 'model.path' must name a Hugging Face id or local directory")
    if not 0 < cfg.ig.storage_ratio <= 1:
        raise ConfigError(f"config key 'ig.storage_ratio' = {cfg.ig.storage_ratio}; expected 0 < ratio <= 1")
    for key in ("refine.t", "refine.t_base"):
        value = OmegaConf.select(cfg, key)
        if value < cfg.ig.storage_ratio:
            raise ConfigError(
                f"config key {key!r} = {value} is below ig.storage_ratio = {cfg.ig.storage_ratio}: attribution "
                "shards only keep scores >= storage_ratio x max, so this threshold cannot be applied exactly. "
                f"Use {key} >= {cfg.ig.storage_ratio} or rerun attribution with a lower ig.storage_ratio."
            )
    if cfg.ig.m < 1:
        raise ConfigError(f"config key 'ig.m' = {cfg.ig.m}; expected >= 1")
