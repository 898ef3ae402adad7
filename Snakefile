# MLP-Mixer reproduction: official ImageNet-21k checkpoints -> PyTorch (timm) -> fine-tuning on
# the five datasets of Table 3 with the paper's protocol -> evaluation -> an HTML report beside the paper.
#
#   snakemake --cores all --resources gpu=2 preflight            # first, on a new node (`make preflight`)
#   snakemake --cores all --resources gpu=2                      # the study (config.yaml)
#   snakemake --configfile demo/config.yaml --cores 2            # the offline demo (`make demo`)
#
# A --configfile replaces config.yaml entirely (it is never merged with it), so the demo's outputs
# and settings never mix with the study's.
from snakemake.utils import min_version

min_version("9.0")

if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    ckpt="[A-Za-z0-9_]+",
    dataset="[A-Za-z0-9_]+",
    lr="[0-9.e+-]+",
    seed="[0-9]+",
    protocol="[A-Za-z0-9_]+",
    source="finetune|released",
    shape="p[0-9]+-[A-Za-z0-9-]+",  # matrix.job_shape (never "summary")


include: "rules/weights.smk"
include: "rules/preflight.smk"
include: "rules/data.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        preflight_summary(),
        report_file("index.html"),
