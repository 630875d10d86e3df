"""Shared command-line plumbing for the stage CLIs.

A stage is called as ``python -m kn.stages.<stage> --in kind=path --in kind:key=path
--out name=path key=value ...``: named inputs (``kind:key`` for one file per relation,
shard or variant), named outputs, and the Hydra overrides of the config sections the stage
reads (:mod:`kn.stages.sections`). The stage's ``main`` sees those sections and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from kn.config import ConfigError, compose_config, restrict_config
from kn.stages.sections import sections_of

log = logging.getLogger("kn")


@dataclass
class StageArgs:
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    cfg: DictConfig
    threads: int
    relation: str | None = None
    shard: int | None = None
    variant: str | None = None

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise SystemExit(f"missing --in {name}=PATH (given: {sorted(self.inputs)})")
        return self.inputs[name]

    def optional_input(self, name: str) -> Path | None:
        """``--in name=PATH`` if given (e.g. the trained organism's folder, absent for a pretrained model)."""
        return self.inputs.get(name)

    def keyed_inputs(self, kind: str, required: bool = True) -> dict[str, Path]:
        """The ``--in <kind>:<key>=PATH`` inputs (one per relation, shard or variant) as {key: path},
        sorted by key as strings (the SPEC §2 relation order); at least one unless not ``required``."""
        found = {name.split(":", 1)[1]: path for name, path in self.inputs.items() if name.startswith(f"{kind}:")}
        if not found and required:
            raise SystemExit(f"no --in {kind}:<key>=PATH inputs given (given: {sorted(self.inputs)})")
        return dict(sorted(found.items()))

    def require_relation(self) -> str:
        if self.relation is None:
            raise SystemExit("this stage needs --relation")
        return self.relation

    def require_variant(self) -> str:
        if self.variant is None:
            raise SystemExit("this stage needs --variant")
        return self.variant

    def output(self, name: str) -> Path:
        if name not in self.outputs:
            raise SystemExit(f"missing --out {name}=PATH (given: {sorted(self.outputs)})")
        return self.outputs[name]


@dataclass
class LoadedModel:
    """The studied model, its tokenizer, how it reads prompts, where it came from and where it runs."""

    model: Any
    tokenizer: Any
    spec: str  # the trained organism's folder, or model.path (HF id or local directory)
    device: str
    codec: Any  # kn.models.encoding.PromptCodec: masked or causal (the adapter decides), with the causal section

    def record(self) -> dict[str, str]:
        """For provenance: which weights, which kind of LM, on which device."""
        return {"model": self.spec, "kind": "causal" if self.codec.causal else "masked", "device": self.device}


def load_model(args: StageArgs) -> LoadedModel:
    """The model a stage studies: ``--in model=<dir>`` (the trained organism) or ``model.path``,
    on the configured ``device``, with ``model.layer_norm_eps`` applied, and its prompt codec
    (the ``causal`` section says how a causal LM reads prompts)."""
    from omegaconf import OmegaConf

    from kn.devices import resolve_device
    from kn.models.encoding import PromptCodec
    from kn.models.load import load_lm

    cfg = args.cfg
    spec = str(args.optional_input("model") or cfg.model.path)
    if spec == "None":
        raise SystemExit("no model: pass --in model=<trained organism folder> or set model.path")
    device = resolve_device(str(cfg.device))
    model, tokenizer = load_lm(spec, device, cfg.model.layer_norm_eps)
    log.info("model %s loaded on device %s", spec, device)  # scripts/device_check.py reads it from job logs
    codec = PromptCodec.of(model, tokenizer, OmegaConf.to_container(cfg.causal, resolve=True))
    return LoadedModel(model, tokenizer, spec, str(device), codec)


def _pairs(values: Sequence[str], flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} expects name=path, got {item!r}")
        out[name] = Path(path)
    return out


def parse_stage_args(argv: Sequence[str] | None, stage: str, description: str) -> StageArgs:
    parser = argparse.ArgumentParser(prog=f"python -m kn.stages.{stage}", description=description)
    parser.add_argument("--in", dest="inputs", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--out", dest="outputs", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--relation", default=None, help="relation id for per-relation stages")
    parser.add_argument("--shard", type=int, default=None, help="shard index for sharded stages")
    parser.add_argument("--variant", default=None, help="organism-sweep variant name")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    ns = parser.parse_args(argv)
    try:
        cfg = restrict_config(compose_config(ns.overrides), sections_of(stage))
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from exc
    return StageArgs(
        _pairs(ns.inputs, "--in"), _pairs(ns.outputs, "--out"), cfg, ns.threads, ns.relation, ns.shard, ns.variant
    )


def setup_runtime(seed: int, threads: int) -> None:
    """Logging to stderr (Snakemake redirects it to the rule's log), seeds, thread count."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if "torch" in sys.modules:  # seed torch only for stages that use it (importing it costs seconds)
        import torch

        torch.manual_seed(seed)
        torch.set_num_threads(max(1, threads))
        torch.backends.cuda.matmul.allow_tf32 = False  # SPEC §0: no TF32
        torch.backends.cudnn.allow_tf32 = False


def stage_name(main: Callable[[StageArgs], None]) -> str:
    """``kn.stages.refine.main`` -> ``refine`` (also when the module runs as ``python -m``)."""
    module = sys.modules[main.__module__]
    spec = getattr(module, "__spec__", None)
    return (spec.name if spec is not None else main.__module__).rsplit(".", 1)[-1]


def run_stage(main: Callable[[StageArgs], None], argv: Sequence[str] | None = None) -> None:
    """Parse args, set up the runtime, run ``main``; user errors exit with one clear line."""
    stage = stage_name(main)
    args = parse_stage_args(argv, stage, sys.modules[main.__module__].__doc__ or "")
    setup_runtime(int(args.cfg.seed), args.threads)
    try:
        main(args)
    except (ConfigAttributeError, ConfigKeyError) as exc:  # a read outside the stage's declared sections: a bug
        raise RuntimeError(
            f"stage {stage} read config key {getattr(exc, 'full_key', exc)!r}, which kn.stages.sections does not "
            f"list for it: add the section there so the Snakefile passes it"
        ) from exc
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from exc
