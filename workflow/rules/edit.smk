# Editing case studies: update facts (SPEC §7) and erase relations (SPEC §8). One job each:
# the update sampling draws from one random stream across all relations (SPEC §13).

EDITING = "5. Editing"
EDIT_INPUTS = [*per_relation(L.relation_prompts).values(), *per_relation(L.neurons).values()]
EDIT_ARGS = keyed_args(data=per_relation(L.relation_prompts), neurons=per_relation(L.neurons))


rule edit_update:
    input:
        model_input(),
        EDIT_INPUTS,
    output:
        edits=L.path("edit/update.parquet"),
        summary_csv=report(L.path("edit/update_summary.csv"), caption="../report/update_summary.rst", category=EDITING),
        summary_md=L.path("edit/update_summary.md"),
    params:
        record=L.benchmark(L.path("edit/update")),
        overrides=stage_args("edit_update"),
        model=MODEL_FLAG,
        study=EDIT_ARGS,
    log:
        L.log(L.path("edit/update")),
    benchmark:
        L.benchmark(L.path("edit/update"))
    threads: 1
    priority: PRIORITY["edit_update"]
    resources:
        mem_mb=3000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} edit_update --threads {threads} {params.study} {params.model} --out update={output.edits} "
        "--out summary_csv={output.summary_csv} --out summary_md={output.summary_md} "
        "{params.overrides} > {log} 2>&1"


rule edit_erase:
    input:
        model_input(),
        EDIT_INPUTS,
    output:
        erase_csv=report(L.path("edit/erase.csv"), caption="../report/erase.rst", category=EDITING),
        erase_md=L.path("edit/erase.md"),
    params:
        record=L.benchmark(L.path("edit/erase")),
        overrides=stage_args("edit_erase"),
        model=MODEL_FLAG,
        study=EDIT_ARGS,
    log:
        L.log(L.path("edit/erase")),
    benchmark:
        L.benchmark(L.path("edit/erase"))
    threads: 1
    priority: PRIORITY["edit_erase"]
    resources:
        mem_mb=3000,
        gpu=GPU,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.worker --record {params.record} edit_erase --threads {threads} {params.study} {params.model} --out erase_csv={output.erase_csv} "
        "--out erase_md={output.erase_md} {params.overrides} > {log} 2>&1"


TARGETS.extend(
    [
        L.path("edit/update.parquet"),
        L.path("edit/update_summary.csv"),
        L.path("edit/update_summary.md"),
        L.path("edit/erase.csv"),
        L.path("edit/erase.md"),
    ]
)
