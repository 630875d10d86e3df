# kn: Knowledge Neurons (Dai et al., ACL 2022), end to end.
#   snakemake --cores 2                                        # the embedded default (kn-tiny)
#   snakemake --cores 2 --config 'overrides=["data.relations=[P101]"]'
# The config comes from conf/ through Hydra's compose API (workflow/rules/common.smk).


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/neurons.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/localise.smk"
include: "workflow/rules/edit.smk"
include: "workflow/rules/controls.smk"
include: "workflow/rules/distant.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/sweep.smk"


rule all:
    input:
        all_targets,
    default_target: True
