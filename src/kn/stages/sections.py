"""The config sections each stage reads: the one list both sides use.

The Snakefile passes exactly these sections of its resolved config to the stage as
``key=value`` params (so a change reruns exactly the jobs that read it), and the stage CLI
hands its ``main`` a config holding these sections and nothing else (reading any other key
fails). What a job records as its config is therefore what it received and used, never a
default it did not get. ``None`` means the whole config (the summary prints it; the sweep
stages recompose the user's own overrides, whose variant keys no flattened section holds).

Kept free of heavy imports: the Snakefile imports it at parse time.
"""

from __future__ import annotations

from typing import Optional

MODEL_STAGE = ("seed", "device", "model", "causal")  # stages that load the model (causal: how a causal LM reads prompts)

SECTIONS: dict[str, Optional[tuple[str, ...]]] = {
    "ingest_relation": ("seed", "data.resources_dir", "data.max_facts_per_relation"),
    "ingest": ("seed",),
    "train_model": ("seed", "data.resources_dir", "data.max_facts_per_relation", "study.facts_per_relation", "model",
                    "causal.templates_ending_in_y", "distant.resources_dir"),
    "probe": MODEL_STAGE,
    "probe_summary": (*MODEL_STAGE, "data.resources_dir"),
    "attribute": (*MODEL_STAGE, "study", "ig"),
    "refine": ("seed", "refine", "ig.storage_ratio"),
    "kn_analysis": ("seed", "analysis"),
    "evaluate": (*MODEL_STAGE, "study", "evaluate"),
    "evaluate_summary": ("seed", "evaluate.bootstrap"),
    "localise": (*MODEL_STAGE, "study", "localise.batch_size"),
    "localise_summary": ("seed", "model.name", "localise.bootstrap"),
    "edit_update": (*MODEL_STAGE, "study", "edit", "refine.relation_share"),
    "edit_erase": (*MODEL_STAGE, "study", "erase"),
    "distant": (*MODEL_STAGE, "study", "distant.max_len", "distant.max_mask_word", "distant.head_redraws",
                "distant.batch_size"),
    "distant_summary": ("seed", "model.name", "distant.max_len", "distant.max_unk_share", "distant.bootstrap"),
    "distant_triggers": ("seed", "distant.trigger_lines"),
    "plant_facts": (*MODEL_STAGE, "study", "data.resources_dir", "data.max_facts_per_relation", "controls"),
    "controls_summary": (*MODEL_STAGE, "study", "controls.batch_size", "evaluate.suppress_factor",
                         "evaluate.amplify_factor", "evaluate.bootstrap", "edit"),
    "summary": None,
    "sweep_collect": None,
    "sweep_summary": None,
}


def sections_of(stage: str) -> Optional[tuple[str, ...]]:
    """The sections ``stage`` reads (None: the whole config)."""
    if stage not in SECTIONS:
        raise KeyError(f"stage {stage!r} has no entry in kn.stages.sections.SECTIONS; known: {sorted(SECTIONS)}")
    return SECTIONS[stage]
