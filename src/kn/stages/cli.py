"""Shared command-line plumbing for the stage CLIs.

A stage is called as ``python -m kn.stages.<stage> --in name=path --out name=path
[--log path] key=value ...``: named input/output paths plus Hydra overrides that
re-compose the same config the Snakefile saw.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from kn.config import ConfigError, compose_config

log = logging.getLogger("kn")


@dataclass
class StageArgs:
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    cfg: DictConfig
    threads: int
    relation: str | None = None
    shard: int | None = None

    def input(self, name: str) -> Path:
        if name not in self.inputs:
            raise SystemExit(f"missing --in {name}=PATH (given: {sorted(self.inputs)})")
        return self.inputs[name]

    def keyed_inputs(self, kind: str) -> dict[str, Path]:
        """The ``--in <kind>:<key>=PATH`` inputs (one per relation or variant) as {key: path},
        sorted by key as strings (the SPEC §2 relation order); at least one is required."""
        found = {name.split(":", 1)[1]: path for name, path in self.inputs.items() if name.startswith(f"{kind}:")}
        if not found:
            raise SystemExit(f"no --in {kind}:<key>=PATH inputs given (given: {sorted(self.inputs)})")
        return dict(sorted(found.items()))

    def output(self, name: str) -> Path:
        if name not in self.outputs:
            raise SystemExit(f"missing --out {name}=PATH (given: {sorted(self.outputs)})")
        return self.outputs[name]


def _pairs(values: Sequence[str], flag: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} expects name=path, got {item!r}")
        out[name] = Path(path)
    return out


def parse_stage_args(argv: Sequence[str] | None, description: str) -> StageArgs:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--in", dest="inputs", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--out", dest="outputs", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--relation", default=None, help="relation id for per-relation stages")
    parser.add_argument("--shard", type=int, default=None, help="shard index for sharded stages")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    ns = parser.parse_args(argv)
    try:
        cfg = compose_config(ns.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from exc
    return StageArgs(
        _pairs(ns.inputs, "--in"), _pairs(ns.outputs, "--out"), cfg, ns.threads, ns.relation, ns.shard
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


def run_stage(main: Callable[[StageArgs], None], description: str, argv: Sequence[str] | None = None) -> None:
    """Parse args, set up the runtime, run ``main``; user errors exit with one clear line."""
    args = parse_stage_args(argv, description)
    setup_runtime(int(args.cfg.seed), args.threads)
    try:
        main(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        log.error("%s", exc)
        raise SystemExit(f"error: {exc}") from exc
