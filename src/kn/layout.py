"""Where every result file lives: the one owner of the results folder's layout.

The Snakefile's rules name their outputs with it, and anything that reads a finished run
(the organism sweep) asks it for the same paths, so the layout is written down once.
Arguments may be Snakemake wildcards (``"{relation}"``). Kept free of heavy imports: the
Snakefile imports it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass


RESULT_SUFFIXES = (".parquet", ".json", ".csv", ".md", ".png")


@dataclass(frozen=True)
class Layout:
    """Paths under ``results`` for the model alias ``model`` (docs/CONTRACTS.md lists the files)."""

    results: str
    model: str

    # ------------------------------------------------------------------ shared by every model
    def relation_prompts(self, relation: str) -> str:
        return f"{self.results}/data/relations/{relation}.parquet"

    def data(self, name: str) -> str:
        """``prompts.parquet``, ``facts.parquet`` or ``stats.json``."""
        return f"{self.results}/data/{name}"

    def log(self, output: str) -> str:
        """A job's log mirrors its (main) output path under results/logs/, the file type dropped."""
        return f"{self.results}/logs/{self._stem(output)}.log"

    def benchmark(self, output: str) -> str:
        """A job's benchmark mirrors its (main) output path under results/benchmarks/."""
        return f"{self.results}/benchmarks/{self._stem(output)}.tsv"

    def _stem(self, output: str) -> str:
        relative = output.removeprefix(self.results + "/")
        for suffix in RESULT_SUFFIXES:
            if relative.endswith(suffix):
                return relative.removesuffix(suffix)
        return relative

    def run_config(self, sha256: str) -> str:
        return f"{self.results}/run_configs/{sha256}.yaml"

    # ------------------------------------------------------------------ per model
    @property
    def model_dir(self) -> str:
        return f"{self.results}/{self.model}"

    def path(self, relative: str) -> str:
        """Any file of the model's study, by its path under the model folder."""
        return f"{self.model_dir}/{relative}"

    @property
    def trained_model(self) -> str:
        return self.path("model")

    def probe(self, relation: str) -> str:
        return self.path(f"probe/{relation}.parquet")

    def scores(self, relation: str, shard: str) -> str:
        return self.path(f"attributions/{relation}/{shard}.parquet")

    def shard_prompts(self, relation: str, shard: str) -> str:
        return self.path(f"attributions/{relation}/{shard}.prompts.parquet")

    def neurons(self, relation: str) -> str:
        return self.path(f"neurons/{relation}.parquet")

    def refine_record(self, relation: str) -> str:
        return self.path(f"neurons/{relation}.json")

    def evaluation(self, relation: str) -> str:
        return self.path(f"evaluate/{relation}.parquet")

    def localisation(self, relation: str) -> str:
        return self.path(f"localise/{relation}.parquet")

    def dose(self, relation: str) -> str:
        return self.path(f"evaluate/{relation}.dose.parquet")

    def distant(self, relation: str, kind: str) -> str:
        """Stage 4's per-relation tables: kind is facts, sentences or activations."""
        return self.path(f"distant/{relation}.{kind}.parquet")
