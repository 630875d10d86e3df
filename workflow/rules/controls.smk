# Positive control (kn.planting, kn.controls): facts the model does not know are planted into known FFN units of a
# copy of it; this workflow's own attribute -> refine -> evaluate -> localise rules then run on the copy (a nested
# run into results/<model>/controls/, as the organism sweep runs its variants), and controls_summary reads how much
# of the planted storage they recover. The run's negative control is evaluate's random neurons.

CONTROLS = "7. Positive control"

if CFG.controls.enabled:

    rule plant_facts:
        input:
            model_input(),
            pararel_files(RELATIONS),
            data=list(per_relation(L.relation_prompts).values()),
        output:
            model=directory(f"{CONTROL_DIR}/model"),
            pararel=directory(f"{CONTROL_DIR}/pararel"),
            record=f"{CONTROL_DIR}/planting.json",
            accepted=f"{CONTROL_DIR}/acceptance.txt",
        params:
            record=L.benchmark(f"{CONTROL_DIR}/planting.json"),
            overrides=stage_args("plant_facts"),
            model=MODEL_FLAG,
            data=keyed_args(data=per_relation(L.relation_prompts)),
        log:
            L.log(f"{CONTROL_DIR}/planting.json"),
        benchmark:
            L.benchmark(f"{CONTROL_DIR}/planting.json")
        threads: 1
        priority: PRIORITY["attribute"]
        resources:
            mem_mb=3000 if TRAINED else 12000,
            gpu=GPU,
        conda:
            CONDA_ENV
        shell:
            "python -m kn.worker --record {params.record} plant_facts --threads {threads} {params.model} {params.data} "
            "--out model={output.model} --out pararel={output.pararel} --out record={output.record} "
            "--out accepted={output.accepted} {params.overrides} > {log} 2>&1"

    checkpoint planted_study:
        input:
            f"{CONTROL_DIR}/model",
            f"{CONTROL_DIR}/pararel",
            record=f"{CONTROL_DIR}/planting.json",
            accepted=f"{CONTROL_DIR}/acceptance.txt",
        output:
            f"{CONTROL_DIR}/study.json",
        params:
            config=shlex.quote(f"overrides={json.dumps(planted_overrides())}"),
            snakefile=workflow.main_snakefile,
        log:
            L.log(f"{CONTROL_DIR}/study.json"),
        benchmark:
            L.benchmark(f"{CONTROL_DIR}/study.json")
        threads: 1  # the nested run uses one core beside the main study (with every core it would wait for both to free)
        conda:
            CONDA_ENV
        shell:
            # a planting that failed its acceptance is reported, not studied; --nolock: the outer run holds the lock,
            # the nested run writes only under the controls folder
            "(if grep -qx passed {input.accepted}; then "
            "snakemake --snakefile {params.snakefile} --cores {threads} --nolock kn_analysis evaluate_summary "
            "localise_summary --config {params.config} && echo '{{\"ran\": true}}' > {output}; "
            "else echo 'planting failed its acceptance: no planted study'; echo '{{\"ran\": false}}' > {output}; fi"
            ") > {log} 2>&1"

    rule controls_summary:
        input:
            lambda wc: list(planted_study_files().values()),
        output:
            table=report(f"{CONTROL_DIR}/planted.csv", caption="../report/controls_planted.rst", category=CONTROLS),
            layers=f"{CONTROL_DIR}/planted_layers.csv",
            facts=f"{CONTROL_DIR}/planted_facts.csv",
            markdown=f"{CONTROL_DIR}/planted.md",
            json=f"{CONTROL_DIR}/summary.json",
            figure_png=report(f"{CONTROL_DIR}/recall.png", caption="../report/controls_recall.rst", category=CONTROLS),
            figure_pdf=f"{CONTROL_DIR}/recall.pdf",
        params:
            record=L.benchmark(f"{CONTROL_DIR}/planted"),
            overrides=stage_args("controls_summary"),
            inputs=lambda wc: " ".join(f"--in {name}={shlex.quote(path)}" for name, path in planted_study_files().items()),
        log:
            L.log(f"{CONTROL_DIR}/planted"),
        benchmark:
            L.benchmark(f"{CONTROL_DIR}/planted")
        threads: 1
        resources:
            mem_mb=3000 if TRAINED else 12000,
            gpu=GPU,
        conda:
            CONDA_ENV
        shell:
            "python -m kn.worker --record {params.record} controls_summary --threads {threads} {params.inputs} "
            "--out table={output.table} --out layers={output.layers} --out facts={output.facts} "
            "--out markdown={output.markdown} --out json={output.json} --out figure_png={output.figure_png} "
            "--out figure_pdf={output.figure_pdf} {params.overrides} > {log} 2>&1"

    TARGETS.extend([f"{CONTROL_DIR}/planted.csv", f"{CONTROL_DIR}/summary.json", f"{CONTROL_DIR}/recall.png"])
