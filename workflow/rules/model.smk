# Models: train the embedded organism (model.source=trained), then probe what the model knows.

if TRAINED:

    rule train_model:
        input:
            pararel_files(ALL_RELATIONS),  # training reads every relation, whatever data.relations selects
            # a natural-text recipe (model.train.natural_ratio > 0) also reads the web sentences
            [f"{CFG.distant.resources_dir}/{name}" for name in ("sentences.parquet", "stats.json")]
            if CFG.model.train.get("natural_ratio", 0) > 0 else [],
        output:
            model=directory(L.trained_model),
            card=report(L.path("model_card.md"), caption="../report/model_card.rst", category="1. Model"),
            metrics=L.path("training/metrics.json"),
            loss=report(L.path("training/loss.png"), caption="../report/training_loss.rst", category="1. Model"),
        params:
            record=L.benchmark(L.path("training/train_model")),
            overrides=stage_args("train_model"),
        log:
            L.log(L.path("training/train_model")),
        benchmark:
            L.benchmark(L.path("training/train_model"))
        threads: CFG.model.train.threads  # the stage runs that many torch threads even if --cores grants fewer
        resources:
            mem_mb=4000,
        conda:
            CONDA_ENV
        shell:
            "python -m kn.worker --record {params.record} train_model --out model={output.model} "
            "--out card={output.card} --out metrics={output.metrics} --out loss={output.loss} "
            "{params.overrides} > {log} 2>&1"

    TARGETS.append(L.path("model_card.md"))


rule probe:
    input:
        model_input(),
        data=L.relation_prompts("{relation}"),
    output:
        L.probe("{relation}"),
    params:
        record=L.benchmark(L.probe("{relation}")),
        overrides=stage_args("probe"),
        model=MODEL_FLAG,
    log:
        L.log(L.probe("{relation}")),
    benchmark:
        L.benchmark(L.probe("{relation}"))
    threads: 1
    priority: PRIORITY["probe"]
    resources:
        mem_mb=3000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} probe --relation {wildcards.relation} --threads {threads} --in data={input.data} "
        "{params.model} --out probe={output} {params.overrides} > {log} 2>&1"


rule probe_summary:
    input:
        model_input(),
        pararel_files(ALL_RELATIONS),  # relation use puts subjects into every relation's templates
        probes=list(per_relation(L.probe).values()),
        data=list(per_relation(L.relation_prompts).values()),
    output:
        csv=report(L.path("probe/accuracy.csv"), caption="../report/probe_accuracy.rst", category="1. Model"),
        md=L.path("probe/accuracy.md"),
    params:
        record=L.benchmark(L.path("probe/accuracy")),
        overrides=stage_args("probe_summary"),
        model=MODEL_FLAG,
        tables=keyed_args(probe=per_relation(L.probe), data=per_relation(L.relation_prompts)),
    log:
        L.log(L.path("probe/accuracy")),
    benchmark:
        L.benchmark(L.path("probe/accuracy"))
    threads: 1
    resources:
        mem_mb=3000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} probe_summary --threads {threads} {params.tables} {params.model} "
        "--out csv={output.csv} --out md={output.md} {params.overrides} > {log} 2>&1"


TARGETS.extend([L.path("probe/accuracy.csv"), L.path("probe/accuracy.md")])
