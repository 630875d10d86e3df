# The run's summary (paper vs this run, model card, config) and the Snakemake report:
#   snakemake --report results/report.html
# Every figure and table of the study is flagged with report() in the rule that writes it,
# with a caption under workflow/report/; this file adds the summary and the front page.


report: "../report/workflow.rst"


# Files the summary reads, each only if a rule of this workflow writes it (e.g. train_model only for trained models).
SUMMARY_INPUTS = {
    name: path
    for name, (rule_name, path) in {
        "data_stats": ("ingest", f"{RESULTS}/data/stats.json"),
        "model_card": ("train_model", f"{MODEL_DIR}/model_card.md"),
        "kn_stats": ("kn_analysis", f"{MODEL_DIR}/analysis/kn_stats.json"),
        "evaluate": ("evaluate_summary", f"{MODEL_DIR}/evaluate/summary.csv"),
        "update": ("edit_update", f"{MODEL_DIR}/edit/update_summary.csv"),
        "erase": ("edit_erase", f"{MODEL_DIR}/edit/erase.csv"),
        "distant": ("distant_summary", f"{MODEL_DIR}/distant/activation_overall.csv"),
        "table:probe": ("probe_summary", f"{MODEL_DIR}/probe/accuracy.csv"),
        "table:kn_stats": ("kn_analysis", f"{MODEL_DIR}/analysis/kn_stats.csv"),
        "table:evaluate": ("evaluate_summary", f"{MODEL_DIR}/evaluate/summary.csv"),
        "table:distant_overall": ("distant_summary", f"{MODEL_DIR}/distant/activation_overall.csv"),
        "table:distant_usability": ("distant_summary", f"{MODEL_DIR}/distant/usability.csv"),
        "table:update": ("edit_update", f"{MODEL_DIR}/edit/update_summary.csv"),
        "table:erase": ("edit_erase", f"{MODEL_DIR}/edit/erase.csv"),
    }.items()
    if rules.has(rule_name)  # hasattr() would raise: Snakemake's Rules raises WorkflowError, not AttributeError
}


rule summary:
    input:
        list(dict.fromkeys(SUMMARY_INPUTS.values())),
    output:
        markdown=report(
            f"{MODEL_DIR}/summary.md", caption="../report/summary_md.rst", category="0. Summary", labels={"file": "summary.md"}
        ),
        table=report(
            f"{MODEL_DIR}/summary.csv", caption="../report/summary_csv.rst", category="0. Summary", labels={"file": "summary.csv"}
        ),
        html=report(
            f"{MODEL_DIR}/summary.html", caption="../report/summary_html.rst", category="0. Summary", labels={"file": "summary.html"}
        ),
    params:
        # the whole config: the summary prints it, so any change reruns it
        overrides=stage_args(*CFG.keys()),
        inputs=" ".join(f"--in {name}={shlex.quote(path)}" for name, path in SUMMARY_INPUTS.items()),
        benchmarks=f"--in benchmarks={shlex.quote(bench_path(f'{MODEL}/attributions').removesuffix('.tsv'))}",
    log:
        log_path(f"{MODEL}/summary"),
    benchmark:
        bench_path(f"{MODEL}/summary")
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.summary {params.inputs} {params.benchmarks} --out markdown={output.markdown} "
        "--out table={output.table} --out html={output.html} {params.overrides} > {log} 2>&1"


TARGETS.extend([f"{MODEL_DIR}/summary.md", f"{MODEL_DIR}/summary.csv", f"{MODEL_DIR}/summary.html"])
