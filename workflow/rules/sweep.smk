# Model-organism sweep (issue 9), active only with experiment=organism-sweep (sweep.variants set).
# Each variant is this same workflow run with the variant's overrides into its own results
# directory, so its model goes through the same train_model rule and its study through the
# same attribution/refine/evaluate rules; the outer job only collects the variant's files.
SWEEP_VARIANTS = [
    name for name in CFG.sweep.variants if CFG.sweep.only is None or name in CFG.sweep.only
]


if SWEEP_VARIANTS:

    rule sweep_variant:
        output:
            f"{RESULTS}/sweep/{{variant}}.json",
        params:
            config=lambda wc: variant_config_arg(wc.variant),
            snakefile=workflow.main_snakefile,
            targets=lambda wc: " ".join(variant_targets(wc.variant)),
            variant_dir=lambda wc: f"{RESULTS}/sweep/{wc.variant}",
            overrides=user_overrides(),
        log:
            log_path("sweep/{variant}"),
        benchmark:
            bench_path("sweep/{variant}")
        threads: CFG.sweep.cores_per_variant
        resources:
            mem_mb=4000 * CFG.sweep.cores_per_variant,
        conda:
            CONDA_ENV
        shell:
            "(snakemake --snakefile {params.snakefile} --cores {threads} {params.targets} "
            "--config {params.config} && python -m kn.stages.sweep_collect --in variant_dir={params.variant_dir} "
            "--out record={output} {params.overrides}) > {log} 2>&1"

    rule sweep_summary:
        input:
            expand(f"{RESULTS}/sweep/{{variant}}.json", variant=SWEEP_VARIANTS),
        output:
            csv=report(f"{RESULTS}/sweep/sweep.csv", caption="../report/sweep_table.rst", category="6. Organism sweep"),
            md=f"{RESULTS}/sweep/sweep.md",
            json=f"{RESULTS}/sweep/sweep.json",
            png=report(f"{RESULTS}/sweep/effects.png", caption="../report/sweep_effects.rst", category="6. Organism sweep"),
            pdf=f"{RESULTS}/sweep/effects.pdf",
            confidence_png=report(
                f"{RESULTS}/sweep/confidence.png", caption="../report/sweep_confidence.rst", category="6. Organism sweep"
            ),
            confidence_pdf=f"{RESULTS}/sweep/confidence.pdf",
        params:
            records=lambda wc, input: " ".join(f"--in record:{Path(p).stem}={p}" for p in input),
            overrides=user_overrides(),
        log:
            log_path("sweep/summary"),
        benchmark:
            bench_path("sweep/summary")
        conda:
            CONDA_ENV
        shell:
            "python -m kn.stages.sweep_summary {params.records} --out csv={output.csv} --out markdown={output.md} "
            "--out json={output.json} --out figure_png={output.png} --out figure_pdf={output.pdf} "
            "--out confidence_png={output.confidence_png} --out confidence_pdf={output.confidence_pdf} "
            "{params.overrides} > {log} 2>&1"

    TARGETS.clear()  # the sweep experiment's product is the sweep table, not one model's study
    TARGETS.extend(rules.sweep_summary.output)
