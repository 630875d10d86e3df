# Model-organism sweep, active only with experiment=organism-sweep (sweep.variants set).
# Each variant is this same workflow run with the variant's overrides into its own results
# directory, so its model goes through the same train_model rule and its study through the
# same attribution/refine/evaluate rules; the outer job then collects the variant's files,
# which kn.layout names.
SWEEP_VARIANTS = [name for name in CFG.sweep.variants if CFG.sweep.only is None or name in CFG.sweep.only]
SWEEP = "6. Organism sweep"


if SWEEP_VARIANTS:

    rule sweep_variant:
        output:
            f"{RESULTS}/sweep/{{variant}}.json",
        params:
            config=lambda wc: variant_config_arg(wc.variant),
            snakefile=workflow.main_snakefile,
            targets=lambda wc: " ".join(
                shlex.quote(p) for key in ("metrics", "kn_stats", "effects", "ceiling", "record", "neurons")
                for p in variant_files(wc.variant)[key].values()
            ),
            inputs=lambda wc: variant_args(wc.variant),
            overrides=user_overrides(),
        log:
            L.log(f"{RESULTS}/sweep/{{variant}}"),
        benchmark:
            L.benchmark(f"{RESULTS}/sweep/{{variant}}")
        threads: CFG.sweep.cores_per_variant
        resources:
            mem_mb=4000 * CFG.sweep.cores_per_variant,
        conda:
            CONDA_ENV
        shell:
            "(snakemake --snakefile {params.snakefile} --cores {threads} {params.targets} "
            "--config {params.config} && python -m kn.worker sweep_collect --variant {wildcards.variant} {params.inputs} "
            "--out record={output} {params.overrides}) > {log} 2>&1"

    rule sweep_summary:
        input:
            records=expand(f"{RESULTS}/sweep/{{variant}}.json", variant=SWEEP_VARIANTS),
        output:
            csv=report(f"{RESULTS}/sweep/sweep.csv", caption="../report/sweep_table.rst", category=SWEEP),
            md=f"{RESULTS}/sweep/sweep.md",
            json=f"{RESULTS}/sweep/sweep.json",
            png=report(f"{RESULTS}/sweep/effects.png", caption="../report/sweep_effects.rst", category=SWEEP),
            pdf=f"{RESULTS}/sweep/effects.pdf",
            confidence_png=report(f"{RESULTS}/sweep/confidence.png", caption="../report/sweep_confidence.rst", category=SWEEP),
            confidence_pdf=f"{RESULTS}/sweep/confidence.pdf",
            ceiling_png=report(f"{RESULTS}/sweep/ceiling.png", caption="../report/sweep_ceiling.rst", category=SWEEP),
            ceiling_pdf=f"{RESULTS}/sweep/ceiling.pdf",
        params:
            record=L.benchmark(f"{RESULTS}/sweep/summary"),
            records=lambda wc, input: " ".join(f"--in record:{Path(p).stem}={shlex.quote(p)}" for p in input.records),
            overrides=user_overrides(),
        log:
            L.log(f"{RESULTS}/sweep/summary"),
        benchmark:
            L.benchmark(f"{RESULTS}/sweep/summary")
        threads: 1
        resources:
            mem_mb=2000,
        conda:
            CONDA_ENV
        shell:
            "python -m kn.worker --record {params.record} sweep_summary {params.records} --out csv={output.csv} "
            "--out markdown={output.md} --out json={output.json} --out figure_png={output.png} "
            "--out figure_pdf={output.pdf} --out confidence_png={output.confidence_png} "
            "--out confidence_pdf={output.confidence_pdf} --out ceiling_png={output.ceiling_png} "
            "--out ceiling_pdf={output.ceiling_pdf} {params.overrides} > {log} 2>&1"

    TARGETS.clear()  # the sweep experiment's product is the sweep table, not one model's study
    TARGETS.extend(rules.sweep_summary.output)
