"""Typed schema of the config: wrong types and unknown keys fail with the key's name.

Hydra already rejects overrides of unknown keys; this adds type checks on every value
(including those set in YAML files) by merging the composed config into dataclasses. The
dataclasses carry no defaults: conf/config.yaml is the one source of values. Fractions and
probabilities are declared with :func:`fraction` and checked against their range.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException


@dataclass(frozen=True)
class Range:
    """The values a fraction or probability may take: [0, 1], with either end excluded."""

    low_open: bool
    high_open: bool

    def contains(self, value: float) -> bool:
        return (0 < value if self.low_open else 0 <= value) and (value < 1 if self.high_open else value <= 1)

    def __str__(self) -> str:
        return f"0 {'<' if self.low_open else '<='} value {'<' if self.high_open else '<='} 1"


def fraction(*, low_open: bool = False, high_open: bool = False) -> Any:
    """A field holding a fraction or probability: validate_config checks its range (no default: the YAML gives it)."""
    return dataclasses.field(metadata={"range": Range(low_open, high_open)})


@dataclass
class TrainConfig:
    """The kn-tiny recipe (conf/model/kn-tiny.yaml documents each knob and why it has its value)."""

    seed: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    dropout: float = fraction(high_open=True)
    max_steps: int
    target_accuracy: Optional[float] = fraction(low_open=True)
    eval_every: int
    eval_sample: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    other_mask_prob: float = fraction()
    heldout_templates: int
    heldout_min_templates: int
    vocab_size: int
    architecture: str  # bert (a masked LM: kn-tiny) | gpt2 (a causal LM: kn-tiny-gpt)
    tie_word_embeddings: bool  # false: the output layer gets its own matrix (BERT only)
    freeze_word_embeddings: bool  # token embeddings stay at their random init (BERT only)
    word_embedding_std: Optional[float]  # redraw token embeddings from N(0, std^2); null keeps BERT's init (BERT only)
    freeze_mlm_transform: bool  # the MLM head's dense transform stays at its random init (BERT only)
    threads: int  # torch intra-op threads; the weights depend on it in the last bits, so it is part of the recipe
    # Natural text (docs/organism_search.md); the defaults train on templates only, as kn-tiny does.
    natural_ratio: float = 0.0  # Bing sentences per template prompt in each batch (0: none are read)
    natural_mask_prob: float = 0.15  # masking of a natural sentence's pieces in training (evaluation: 0.15)
    natural_max_tokens: int = 64  # natural sentences are cut to this many pieces ([CLS]/[SEP] included)
    natural_eval_facts: int = 100  # non-studied facts whose sentences are held out to score masked-token accuracy
    mlm_transform_init: str = "random"  # random | identity: the MLM head's dense transform starts as the identity
    natural_pretrain_steps: int = 0  # web-only masked-LM steps before the template phase (needs natural_ratio > 0)
    natural_pretrain_lr: Optional[float] = None  # peak LR of those steps (null: lr); warmup then linear decay to 0


@dataclass
class ModelConfig:
    name: str
    source: str
    path: Optional[str]
    layer_norm_eps: Optional[float]
    train: Optional[TrainConfig]


@dataclass
class DataConfig:
    resources_dir: str
    relations: Any
    max_facts_per_relation: Optional[int]


@dataclass
class StudyConfig:
    facts_per_relation: Optional[int]


@dataclass
class CausalConfig:
    """How causal LMs read prompts (docs/causal.md); masked LMs ignore it."""

    templates_ending_in_y: bool
    target: str


@dataclass
class IGConfig:
    m: int
    alpha_rule: str
    target: str
    storage_ratio: float = fraction(low_open=True)
    facts_per_shard: int
    batch_size: int
    dtype: str


@dataclass
class RefineConfig:
    t: float = fraction(low_open=True)
    t_base: float = fraction(low_open=True)
    p: float = fraction(low_open=True)
    p_step: float = fraction(low_open=True)
    max_evals: int
    target_min: float
    target_max: float
    min_prompts: int
    relation_share: float = fraction(low_open=True)


@dataclass
class AnalysisConfig:
    inter_draws: int


@dataclass
class EvaluateConfig:
    suppress_factor: float
    amplify_factor: float
    random_control: bool
    dose_max_k: int
    dose_ks: list[int]
    bootstrap: int
    batch_size: int


@dataclass
class LocaliseConfig:
    bootstrap: int
    batch_size: int


@dataclass
class EditConfig:
    edits_per_relation: int
    max_attempts: int
    lambda1: int
    lambda2: int
    ppl_facts: int
    success_k: int
    random_baseline: bool
    kn_filter: str
    batch_size: int


@dataclass
class EraseConfig:
    relations: list[str]
    top_k: int
    value: str
    batch_size: int


@dataclass
class DistantConfig:
    resources_dir: str
    max_len: int
    max_mask_word: int
    head_redraws: int
    trigger_relations: list[str]
    trigger_lines: int
    batch_size: int
    bootstrap: int  # resamples (over facts) for the 95% intervals of the overall T1 / T2 / T3 means
    max_unk_share: float = fraction()


@dataclass
class ControlsConfig:
    """The positive control (kn.planting, kn.controls): facts planted in known FFN units of a copy of the model."""

    enabled: bool
    facts_per_relation: int
    max_relations: Optional[int]
    layers: Optional[list[int]]
    units_per_fact: Any  # "auto" or a positive count
    max_units_per_fact: int
    key_template_share: float = fraction(low_open=True, high_open=True)
    activation_quantile: float = fraction(low_open=True)
    background_prompts: int
    value_steps: int
    max_subject_unk_share: float = fraction()
    batch_size: int


@dataclass
class SweepConfig:
    """Model-organism sweep (experiment=organism-sweep); empty variants = no sweep."""

    baseline: str
    only: Optional[list[str]]
    cores_per_variant: int
    variants: dict[str, Any]


@dataclass
class KNConfig:
    """The whole config. Types only: conf/config.yaml is the one place that gives values."""

    seed: int
    results_dir: str
    device: str
    compare: list[str]
    model: ModelConfig
    data: DataConfig
    study: StudyConfig
    causal: CausalConfig
    ig: IGConfig
    refine: RefineConfig
    analysis: AnalysisConfig
    evaluate: EvaluateConfig
    localise: LocaliseConfig
    edit: EditConfig
    erase: EraseConfig
    distant: DistantConfig
    controls: ControlsConfig
    sweep: SweepConfig


_CHOICES = {
    "model.source": {"trained", "pretrained"},
    "ig.alpha_rule": {"left", "right", "midpoint", "gauss_legendre"},
    "ig.target": {"gold", "pred"},
    "causal.target": {"first_token", "sequence"},
    "ig.dtype": {"float32", "bfloat16"},
    "device": {"auto", "cpu", "cuda"},
    "erase.value": {"zero", "unk"},
    "edit.kn_filter": {"code", "paper"},
}


class ConfigError(ValueError):
    """A config key or value the pipeline cannot use; the message names it."""


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key (type, unknown key, choice, range)."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except InterpolationToMissingValueError as exc:  # e.g. model=hf's name, derived from the unset model.path
        match = re.search(r"Missing mandatory value: (\S+)", str(exc))
        missing = [match.group(1) if match else str(getattr(exc, "full_key", "?"))]
    if missing:
        raise ConfigError(
            f"config key {missing[0]!r} has no value (??? in conf/); set it, e.g. {missing[0]}=... on the command "
            "line or in --config 'overrides=[...]'" + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else "")
        )
    schema = OmegaConf.structured(KNConfig)
    try:
        OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_schema_error_message(exc)) from exc
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
    if cfg.model.train is not None and cfg.model.train.architecture not in ("bert", "gpt2"):
        raise ConfigError(f"config key 'model.train.architecture' = {cfg.model.train.architecture!r}; expected one of ['bert', 'gpt2']")
    if cfg.model.source == "pretrained" and not cfg.model.path:
        raise ConfigError("config key 'model.path' must name a Hugging Face id or local directory")
    for key, allowed in fraction_keys().items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not allowed.contains(value):
            raise ConfigError(f"config key {key!r} = {value}; expected a fraction, {allowed}")
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
    _check_controls(cfg.controls)


def _check_controls(controls: DictConfig) -> None:
    """The positive control's counts are positive, its unit count 'auto' or a count, its layers indices."""
    for key in ("facts_per_relation", "max_units_per_fact", "background_prompts", "value_steps", "batch_size"):
        if controls[key] < 1:
            raise ConfigError(f"config key 'controls.{key}' = {controls[key]}; expected >= 1")
    if controls.max_relations is not None and controls.max_relations < 1:
        raise ConfigError(f"config key 'controls.max_relations' = {controls.max_relations}; expected >= 1 or null (all)")
    units = controls.units_per_fact
    if units != "auto" and not (isinstance(units, int) and not isinstance(units, bool) and units >= 1):
        raise ConfigError(f"config key 'controls.units_per_fact' = {units!r}; expected 'auto' or a count >= 1")
    if isinstance(units, int) and units > controls.max_units_per_fact:
        raise ConfigError(f"config key 'controls.units_per_fact' = {units} exceeds controls.max_units_per_fact = "
                          f"{controls.max_units_per_fact}")
    if controls.layers is not None and (len(controls.layers) == 0 or any(layer < 0 for layer in controls.layers)):
        raise ConfigError(f"config key 'controls.layers' = {list(controls.layers)}; expected null (every layer) or "
                          "a non-empty list of layer indices >= 0")


def fraction_keys(section: type = KNConfig, prefix: str = "") -> dict[str, Range]:
    """Every fraction or probability of the config (fields declared with :func:`fraction`), by dotted key."""
    keys: dict[str, Range] = {}
    for item in dataclasses.fields(section):
        key = f"{prefix}{item.name}"
        if "range" in item.metadata:
            keys[key] = item.metadata["range"]
        child = _section_type(section, item.name)
        if child is not None:
            keys.update(fraction_keys(child, f"{key}."))
    return keys


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


def _schema_error_message(exc: OmegaConfBaseException) -> str:
    """One line per problem: the key, the offending value, what is expected (OmegaConf adds debug lines)."""
    key = str(getattr(exc, "full_key", "") or "")
    reason = str(getattr(exc, "msg", exc)).splitlines()[0]
    if reason.startswith("Key ") and " not in " in reason:
        return unknown_key_message(key)
    return f"config key {key or '<root>'!r}: {reason}"
