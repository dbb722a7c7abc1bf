# Root entry point: `snakemake --cores all` from the repository root.
# An include alone would build nothing (Snakemake restores the default target after an include),
# so this file names its own default target: everything `rule all` of the workflow builds.


include: "workflow/Snakefile"


rule default:
    default_target: True
    input:
        rules.all.input,
