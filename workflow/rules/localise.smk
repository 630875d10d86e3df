# Where the model keeps each studied fact (kn.localise): FFN and attention outputs zeroed at the
# target position, the subject's tokens or every position, one layer or all; per relation, then the
# ceilings over relations that bound every knowledge-neuron intervention at the target position.

rule localise:
    input:
        model_input(),
        data=L.relation_prompts("{relation}"),
    output:
        results=L.localisation("{relation}"),
    params:
        record=L.benchmark(L.localisation("{relation}")),
        overrides=stage_args("localise"),
        model=MODEL_FLAG,
    log:
        L.log(L.localisation("{relation}")),
    benchmark:
        L.benchmark(L.localisation("{relation}"))
    threads: 1
    resources:
        mem_mb=4000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} localise --relation {wildcards.relation} --threads {threads} {params.model} "
        "--in data={input.data} --out results={output.results} {params.overrides} > {log} 2>&1"


rule localise_summary:
    input:
        results=list(per_relation(L.localisation).values()),
    output:
        csv=report(L.path("localise/ceiling.csv"), caption="../report/localise_ceiling.rst", category=EFFECTS),
        json=L.path("localise/ceiling.json"),
        png=report(L.path("localise/ceiling.png"), caption="../report/localise_figure.rst", category=EFFECTS),
        pdf=L.path("localise/ceiling.pdf"),
    params:
        record=L.benchmark(L.path("localise/ceiling")),
        overrides=stage_args("localise_summary"),
        tables=keyed_args(results=per_relation(L.localisation)),
    log:
        L.log(L.path("localise/ceiling")),
    benchmark:
        L.benchmark(L.path("localise/ceiling"))
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} localise_summary {params.tables} --out csv={output.csv} --out json={output.json} "
        "--out png={output.png} --out pdf={output.pdf} {params.overrides} > {log} 2>&1"


TARGETS.append(L.path("localise/ceiling.csv"))
