# Models (issue 3): train the embedded organism kn-tiny, then probe what the model knows.

ALL_RELATIONS = list(load_relations(Path(CFG.data.resources_dir)))  # training ignores data.relations
MODEL_FLAG = " ".join(f"--in model={path}" for path in model_input())  # pretrained: the stage uses model.path

if CFG.model.source == "trained":

    rule train_model:
        input:
            sorted({path for rel in ALL_RELATIONS for path in pararel_resources(rel)}),
        output:
            model=directory(f"{MODEL_DIR}/model"),
            card=report(f"{MODEL_DIR}/model_card.md", caption="../report/model_card.rst", category="1. Model"),
            metrics=f"{MODEL_DIR}/training/metrics.json",
            loss=report(f"{MODEL_DIR}/training/loss.png", caption="../report/training_loss.rst", category="1. Model"),
        params:
            overrides=stage_args("seed", "data.resources_dir", "data.max_facts_per_relation", "model"),
        log:
            log_path(f"{MODEL}/training/train_model"),
        benchmark:
            bench_path(f"{MODEL}/training/train_model")
        threads: 1
        resources:
            mem_mb=4000,
        conda:
            CONDA_ENV
        shell:
            "python -m kn.stages.train_model --threads {threads} --out model={output.model} "
            "--out card={output.card} --out metrics={output.metrics} --out loss={output.loss} "
            "{params.overrides} > {log} 2>&1"

    TARGETS.append(f"{MODEL_DIR}/model_card.md")


rule probe:
    input:
        data=lambda wc: relation_data(wc.relation),
        model=model_input(),
    output:
        f"{MODEL_DIR}/probe/{{relation}}.parquet",
    params:
        overrides=stage_args("seed", "model", "ig.device"),
        model_flag=MODEL_FLAG,
    log:
        log_path(f"{MODEL}/probe/{{relation}}"),
    benchmark:
        bench_path(f"{MODEL}/probe/{{relation}}")
    threads: 1
    resources:
        mem_mb=3000,
        gpu=1 if CFG.ig.device == "cuda" else 0,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.probe --relation {wildcards.relation} --threads {threads} --in data={input.data} "
        "{params.model_flag} --out probe={output} {params.overrides} > {log} 2>&1"


rule probe_summary:
    input:
        probes=expand(f"{MODEL_DIR}/probe/{{relation}}.parquet", relation=RELATIONS),
        data=[relation_data(rel) for rel in RELATIONS],
        model=model_input(),
    output:
        csv=report(f"{MODEL_DIR}/probe/accuracy.csv", caption="../report/probe_accuracy.rst", category="1. Model"),
        md=f"{MODEL_DIR}/probe/accuracy.md",
    params:
        overrides=stage_args("seed", "data", "model", "ig.device"),
        model_flag=MODEL_FLAG,
        probe_dir=lambda wc, input: os.path.dirname(input.probes[0]),
        data_dir=lambda wc, input: os.path.dirname(input.data[0]),
    log:
        log_path(f"{MODEL}/probe/accuracy"),
    benchmark:
        bench_path(f"{MODEL}/probe/accuracy")
    threads: 1
    resources:
        mem_mb=3000,
        gpu=1 if CFG.ig.device == "cuda" else 0,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.probe_summary --threads {threads} --in probe_dir={params.probe_dir} "
        "--in data_dir={params.data_dir} {params.model_flag} --out csv={output.csv} --out md={output.md} "
        "{params.overrides} > {log} 2>&1"


TARGETS.extend([f"{MODEL_DIR}/probe/accuracy.csv", f"{MODEL_DIR}/probe/accuracy.md"])
