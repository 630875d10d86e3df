# The run's summary (paper vs this run, model card, config) and the Snakemake report:
#   snakemake --report results/report.html
# Every figure and table of the study is flagged with report() in the rule that writes it,
# with a caption under workflow/report/; this file adds the summary and the front page.


report: "../report/workflow.rst"


# Files the summary reads, each only if a rule of this workflow writes it (e.g. train_model only for trained models).
SUMMARY_INPUTS = {
    name: path
    for name, (rule_name, path) in {
        "data_stats": ("ingest", L.data("stats.json")),
        "model_card": ("train_model", L.path("model_card.md")),
        "kn_stats": ("kn_analysis", L.path("analysis/kn_stats.json")),
        "evaluate": ("evaluate_summary", L.path("evaluate/summary.csv")),
        "ceiling": ("localise_summary", L.path("localise/ceiling.csv")),
        "update": ("edit_update", L.path("edit/update_summary.csv")),
        "erase": ("edit_erase", L.path("edit/erase.csv")),
        "distant": ("distant_summary", L.path("distant/activation_overall.csv")),
        "controls": ("controls_summary", L.path("controls/summary.json")),
        "probe": ("probe_summary", L.path("probe/accuracy.csv")),
        "table:probe": ("probe_summary", L.path("probe/accuracy.csv")),
        "table:kn_stats": ("kn_analysis", L.path("analysis/kn_stats.csv")),
        "table:evaluate": ("evaluate_summary", L.path("evaluate/summary.csv")),
        "table:distant_overall": ("distant_summary", L.path("distant/activation_overall.csv")),
        "table:distant_usability": ("distant_summary", L.path("distant/usability.csv")),
        "table:ceiling": ("localise_summary", L.path("localise/ceiling.csv")),
        "table:update": ("edit_update", L.path("edit/update_summary.csv")),
        "table:erase": ("edit_erase", L.path("edit/erase.csv")),
        "table:controls": ("controls_summary", L.path("controls/planted.csv")),
    }.items()
    if rules.has(rule_name)  # hasattr() would raise: Snakemake's Rules raises WorkflowError, not AttributeError
}
SUMMARY = "0. Summary"
# The job records (benchmark files) of every job of this study before the summary, keyed <rule>/<wildcards>.
RECORDED_RULES = ("ingest_relation", "ingest", "train_model", "probe", "probe_summary", "attribute", "refine", "kn_analysis",
                  "evaluate", "evaluate_summary", "localise", "localise_summary", "edit_update", "edit_erase", "distant",
                  "distant_summary", "plant_facts", "planted_study", "controls_summary")
JOB_WILDCARDS = {  # the jobs of a rule, by its benchmark's wildcards
    (): [{}],
    ("relation",): [{"relation": rel} for rel in RELATIONS],
    ("relation", "shard"): [{"relation": rel, "shard": shard} for rel in RELATIONS for shard in shards(rel)],
}
JOB_RECORDS = {
    "/".join([name, *job.values()]): str(getattr(rules, name).benchmark).format(**job)
    for name in RECORDED_RULES
    if rules.has(name)
    for job in JOB_WILDCARDS[tuple(re.findall(r"{(\w+)}", str(getattr(rules, name).benchmark)))]
}

# Other models' studies shown beside this one (config key compare: [model config names]), e.g. experiment=causal
# shows kn-tiny's masked study beside kn-tiny-gpt's. Each is this workflow run with model=<name> and this run's
# other overrides into the same results folder; the rule runs it only when its summary.csv is missing.
COMPANIONS = {}
for _name in CFG.compare:
    _companion = compose_config(companion_overrides(str(_name)))
    if _companion.model.name == MODEL:
        raise ValueError(f"compare: {_name!r} studies this run's own model {MODEL!r}")
    COMPANIONS[str(_companion.model.name)] = (str(_name), Layout(RESULTS, _companion.model.name))
COMPANION_SUMMARIES = {alias: layout.path("summary.csv") for alias, (_, layout) in COMPANIONS.items()}
COMPANION_PROBES = {alias: layout.path("probe/accuracy.csv") for alias, (_, layout) in COMPANIONS.items()}

if COMPANIONS:

    rule companion_study:
        input:
            list(per_relation(L.relation_prompts).values()),  # start after this run's ingestion (shared files)
        output:
            summary=Layout(RESULTS, "{companion}").path("summary.csv"),
            probe=Layout(RESULTS, "{companion}").path("probe/accuracy.csv"),
        params:
            config=lambda wc: shlex.quote(f"overrides={json.dumps(companion_overrides(COMPANIONS[wc.companion][0]))}"),
            snakefile=workflow.main_snakefile,
        log:
            L.log(f"{RESULTS}/companions/{{companion}}"),
        benchmark:
            L.benchmark(f"{RESULTS}/companions/{{companion}}")
        wildcard_constraints:
            companion="|".join(re.escape(alias) for alias in COMPANIONS),
        threads: 1024  # Snakemake caps a job's threads at --cores: the nested run gets every core (workflow.cores would break --report)
        conda:
            CONDA_ENV
        shell:
            # --nolock: the outer run holds the lock; the nested run writes only its own model's files (and the
            # shared ingestion files, identical for both when the data keys agree)
            "snakemake --snakefile {params.snakefile} --cores {threads} --nolock {output.summary} {output.probe} "
            "--config {params.config} > {log} 2>&1"


rule summary:
    input:
        list(dict.fromkeys(SUMMARY_INPUTS.values())),
        JOB_RECORDS.values(),
        COMPANION_SUMMARIES.values(),
        COMPANION_PROBES.values(),
    output:
        markdown=report(L.path("summary.md"), caption="../report/summary_md.rst", category=SUMMARY, labels={"file": "summary.md"}),
        table=report(L.path("summary.csv"), caption="../report/summary_csv.rst", category=SUMMARY, labels={"file": "summary.csv"}),
        html=report(L.path("summary.html"), caption="../report/summary_html.rst", category=SUMMARY, labels={"file": "summary.html"}),
    params:
        record=L.benchmark(L.path("summary")),
        overrides=stage_args("summary"),  # the whole config: the summary prints it, so any change reruns it
        inputs=" ".join(f"--in {name}={shlex.quote(path)}" for name, path in SUMMARY_INPUTS.items()),
        benchmarks=keyed_args(job=JOB_RECORDS, compare=COMPANION_SUMMARIES, compare_probe=COMPANION_PROBES),
    log:
        L.log(L.path("summary")),
    benchmark:
        L.benchmark(L.path("summary"))
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} summary {params.inputs} {params.benchmarks} --out markdown={output.markdown} "
        "--out table={output.table} --out html={output.html} {params.overrides} > {log} 2>&1"


TARGETS.extend([L.path("summary.md"), L.path("summary.csv"), L.path("summary.html")])
