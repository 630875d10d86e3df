"""Typed schema of the config: wrong types and unknown keys fail with the key's name.

Hydra already rejects overrides of unknown keys; this adds type checks on every value
(including those set in YAML files) by merging the composed config into dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class TrainConfig:
    """The kn-tiny recipe (conf/model/kn-tiny.yaml documents each knob and why it has its default)."""

    seed: int = 0
    num_layers: int = 6
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_heads: int = 4
    dropout: float = 0.0
    max_steps: int = 1200
    target_accuracy: Optional[float] = None
    eval_every: int = 50
    eval_sample: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    other_mask_prob: float = 0.0
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
    batch_size: int = 32
    max_unk_share: float = 0.5


@dataclass
class SweepConfig:
    """Model-organism sweep (experiment=organism-sweep); empty variants = no sweep."""

    baseline: str = "baseline"
    only: Optional[list[str]] = None
    cores_per_variant: int = 1
    variants: dict[str, Any] = field(default_factory=dict)


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

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"config key {missing[0]!r} has no value (??? in conf/); set it, e.g. {missing[0]}=... on the command "
            "line or in --config 'overrides=[...]'" + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else "")
        )
    schema = OmegaConf.structured(KNConfig)
    try:
        OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_schema_error_message(schema, exc)) from exc
    relations = cfg.data.relations
    if not (isinstance(relations, str) or (OmegaConf.is_list(relations) and all(isinstance(r, str) for r in relations))):
        raise ConfigError(
            f"config key 'data.relations' = {relations!r}; expected 'all' or a list of relation ids, e.g. [P101,P19]"
        )
    if OmegaConf.is_list(relations) and len(relations) == 0:
        raise ConfigError("config key 'data.relations' is empty: no facts selected; name relations, e.g. [P101,P19], or 'all'")
    for key in ("data.max_facts_per_relation", "study.facts_per_relation"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r} = {value} selects no facts; expected a positive number or null (all)")
    for key in ("ig.facts_per_shard", "ig.batch_size", "sweep.cores_per_variant"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} = {OmegaConf.select(cfg, key)}; expected >= 1")
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


def unknown_key_message(key: str) -> str:
    """Name the first unknown part of a dotted key, the closest valid key and the valid keys there."""
    section: Any = KNConfig
    parts = key.split(".")
    depth = 0
    while depth < len(parts) - 1:
        child = _section_type(section, parts[depth])
        if child is None:
            break
        section, depth = child, depth + 1
    known = [f.name for f in dataclasses.fields(section)]
    if parts[depth] in known:  # a value or free mapping, indexed further
        field_key = ".".join(parts[: depth + 1])
        if typing.get_origin(typing.get_type_hints(section)[parts[depth]]) is dict:
            return f"config key {field_key!r} is a mapping: add the new entry with +{key}=..."
        return f"config key {field_key!r} is a value, not a section: {key!r} does not exist (see conf/config.yaml)"
    close = difflib.get_close_matches(parts[depth], known, n=1)
    suggestion = ".".join([*parts[:depth], close[0], *parts[depth + 1 :]]) if close else None
    hint = f"; did you mean {suggestion!r}?" if suggestion else "."
    where = f"under {'.'.join(parts[:depth])!r}" if depth else "at the top level"
    return f"unknown config key {key!r}{hint} Valid keys {where}: {', '.join(known)} (see conf/config.yaml)"


def _section_type(section: type, name: str) -> type | None:
    """The dataclass of sub-section ``name`` of ``section`` (unwrapping Optional), or None."""
    hint = typing.get_type_hints(section).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def _schema_error_message(schema: DictConfig, exc: OmegaConfBaseException) -> str:
    """One line per problem: the key, the offending value, what is expected (OmegaConf adds debug lines)."""
    key = str(getattr(exc, "full_key", "") or "")
    reason = str(getattr(exc, "msg", exc)).splitlines()[0]
    if reason.startswith("Key ") and " not in " in reason:
        return unknown_key_message(key)
    expected = OmegaConf.select(schema, key.split("[")[0], default=None, throw_on_missing=False)
    example = f"; its default is {expected!r}" if expected is not None and not OmegaConf.is_config(expected) else ""
    return f"config key {key or '<root>'!r}: {reason}{example} (see conf/config.yaml)"
