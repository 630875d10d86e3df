"""Compose the project config with Hydra's compose API.

The compose API (unlike ``@hydra.main``) never changes directory and never writes an
``outputs/`` folder, so the Snakefile and every stage CLI can call it freely.
``conf/`` is located relative to the package (or ``$KN_CONF_DIR``), never the cwd.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from kn.schema import ConfigError, unknown_key_message, validate_config

__all__ = [
    "ConfigError", "RUN_CONFIG_ENV", "compose_config", "conf_dir", "flatten_overrides",
    "restrict_config", "run_config_text", "to_container",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def model_alias(spec: str) -> str:
    """A results-folder alias for a model path or Hugging Face id: its last component, other characters
    than letters, digits and ``_.-`` replaced by ``-`` (``/models/Llama-3.2-1B`` -> ``Llama-3.2-1B``)."""
    last = str(spec).rstrip("/").rsplit("/", 1)[-1]
    alias = re.sub(r"[^A-Za-z0-9_.\-]", "-", last)
    if not alias.strip(".-"):
        raise ConfigError(f"cannot derive model.name from model.path={spec!r}; set model.name=<alias>")
    return alias


OmegaConf.register_new_resolver("kn_alias", model_alias, replace=True)  # conf/model/hf.yaml: name from path
RUN_CONFIG_ENV = "KN_RUN_CONFIG"  # the Snakefile names its whole resolved config file here for every job


def conf_dir() -> Path:
    """The directory holding ``config.yaml`` (``$KN_CONF_DIR`` wins)."""
    path = Path(os.environ.get("KN_CONF_DIR", REPO_ROOT / "conf")).resolve()
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; set KN_CONF_DIR to the project's conf/ directory")
    return path


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra override strings (``key=value``) and validate it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # Hydra's own errors are terse; name the overrides
        unknown = re.match(r"Could not override '([^']+)'", str(exc))
        if unknown:  # Hydra would suggest '+key=value', which the schema then rejects
            raise ConfigError(f"{unknown_key_message(unknown.group(1))}; overrides: {list(overrides)}") from exc
        raise ConfigError(f"cannot compose config with overrides {list(overrides)}: {exc}") from exc
    try:
        validate_config(cfg)
    except ConfigError as exc:
        raise ConfigError(str(exc) + _default_hint(str(exc), overrides)) from exc
    return cfg


def _default_hint(message: str, overrides: Sequence[str]) -> str:
    """"; its default is X" for the key a type error names, read from conf/ (the schema has no defaults)."""
    match = re.match(r"config key '([^']+)': ", message)
    if not match:
        return ""
    default = None
    if overrides:
        try:
            default = OmegaConf.select(compose_config([]), match.group(1), default=None)
        except ConfigError:
            pass
    shown = "" if default is None or OmegaConf.is_config(default) else f"; its default is {default!r}"
    return shown + " (see conf/config.yaml)"


def run_config_text(cfg: DictConfig, overrides: Sequence[str]) -> tuple[str, str]:
    """(sha256, YAML) of a run's whole resolved config, headed by the overrides that made it.

    The Snakefile writes it once per distinct config as ``<results_dir>/run_configs/<sha256>.yaml``;
    every job's provenance names that file, so any output can be traced to the full config of
    the run that wrote it while the job itself only receives the sections it reads.
    """
    import hashlib

    header = "# overrides: " + json.dumps(list(overrides)) + "\n"
    text = header + OmegaConf.to_yaml(cfg, resolve=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), text


def to_container(cfg: DictConfig | Any) -> Any:
    """Resolved plain-Python copy of a config node (for JSON metadata)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def flatten_overrides(cfg: DictConfig, sections: Sequence[str]) -> list[str]:
    """Turn the named config sections into ``key=value`` overrides a stage CLI re-composes.

    Snakemake passes these strings as ``params:``; any change in a section a stage reads
    changes its params and so reruns exactly that stage's jobs.
    """
    out: list[str] = []
    missing = object()

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if not node:
                out.append(f"{prefix}={{}}")
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}={_hydra_literal(node)}")

    for section in sections:
        node = OmegaConf.select(cfg, section, default=missing)
        if node is missing:  # a null value is a value (e.g. data.max_facts_per_relation: null = every fact)
            raise ConfigError(f"config has no section {section!r}")
        walk(section, to_container(node))
    return out


def restrict_config(cfg: DictConfig, sections: Sequence[str] | None) -> DictConfig:
    """A read-only copy of ``cfg`` holding only ``sections`` (dotted paths); None keeps everything.

    A stage gets exactly the sections it declares (kn.stages.sections), so reading any other
    key raises instead of silently using a default the job never received.
    """
    if sections is None:
        return cfg
    out = OmegaConf.create({})
    missing = object()
    for section in sections:
        value = OmegaConf.select(cfg, section, default=missing)
        if value is missing:
            raise ConfigError(f"config has no section {section!r}")
        OmegaConf.update(out, section, to_container(value), force_add=True)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def _hydra_literal(value: Any) -> str:
    """Render a plain value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_literal(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _looks_numeric(text) or text == "" or any(c in text for c in " ,[]{}()=:'\"\\*?$@#!") or text.lower() in {"null", "true", "false"}:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
