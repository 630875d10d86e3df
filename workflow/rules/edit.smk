# Editing case studies: update facts (SPEC §7) and erase relations (SPEC §8). One job each:
# the update sampling draws from one random stream across all relations (SPEC §13).


# ``--in data:<rel>=... --in neurons:<rel>=...`` for every selected relation.
EDIT_STUDY_ARGS = " ".join(
    f"--in data:{rel}={shlex.quote(relation_data(rel))} --in neurons:{rel}={shlex.quote(f'{MODEL_DIR}/neurons/{rel}.parquet')}"
    for rel in RELATIONS
)
EDIT_STUDY_SECTIONS = ("seed", "results_dir", "model", "study", "data.max_facts_per_relation", "data.relations", "ig.device")


rule edit_update:
    input:
        model_input(),
        neurons=expand(f"{MODEL_DIR}/neurons/{{relation}}.parquet", relation=RELATIONS),
        data=[relation_data(rel) for rel in RELATIONS],
    output:
        edits=f"{MODEL_DIR}/edit/update.parquet",
        summary_csv=report(f"{MODEL_DIR}/edit/update_summary.csv", caption="../report/update_summary.rst", category="5. Editing"),
        summary_md=f"{MODEL_DIR}/edit/update_summary.md",
    params:
        overrides=stage_args(*EDIT_STUDY_SECTIONS, "edit", "refine.relation_share"),
        study=EDIT_STUDY_ARGS,
    log:
        log_path(f"{MODEL}/edit/update"),
    benchmark:
        bench_path(f"{MODEL}/edit/update")
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.edit_update --threads {threads} {params.study} --out update={output.edits} "
        "--out summary_csv={output.summary_csv} --out summary_md={output.summary_md} "
        "{params.overrides} > {log} 2>&1"


rule edit_erase:
    input:
        model_input(),
        neurons=expand(f"{MODEL_DIR}/neurons/{{relation}}.parquet", relation=RELATIONS),
        data=[relation_data(rel) for rel in RELATIONS],
    output:
        erase_csv=report(f"{MODEL_DIR}/edit/erase.csv", caption="../report/erase.rst", category="5. Editing"),
        erase_md=f"{MODEL_DIR}/edit/erase.md",
    params:
        overrides=stage_args(*EDIT_STUDY_SECTIONS, "erase"),
        study=EDIT_STUDY_ARGS,
    log:
        log_path(f"{MODEL}/edit/erase"),
    benchmark:
        bench_path(f"{MODEL}/edit/erase")
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        CONDA_ENV
    shell:
        "python -m kn.stages.edit_erase --threads {threads} {params.study} --out erase_csv={output.erase_csv} "
        "--out erase_md={output.erase_md} {params.overrides} > {log} 2>&1"


TARGETS.extend(
    [
        f"{MODEL_DIR}/edit/update.parquet",
        f"{MODEL_DIR}/edit/update_summary.csv",
        f"{MODEL_DIR}/edit/update_summary.md",
        f"{MODEL_DIR}/edit/erase.csv",
        f"{MODEL_DIR}/edit/erase.md",
    ]
)
