# PSF matching and subtraction.  For now one job per pair runs the whole ImagePsfMatchTask
# (detection, kernel fit, spatial model, convolution); the steps will become separate rules.


rule diffim_config:
    output:
        yaml=DIFFIM_CONFIG,
    log:
        "logs/diffim_config.log",
    localrule: True
    params:
        settings=config["diffim"],
    run:
        write_yaml(params.settings, output.yaml)


rule subtract:
    input:
        template=get_template,
        science=get_science,
        config=DIFFIM_CONFIG,
    output:
        diff="results/{pair}/diff.fits",
        kernel="results/{pair}/kernel.fits",
    log:
        "logs/subtract/{pair}.log",
    benchmark:
        "results/benchmarks/subtract/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: config["subtract"]["threads"]
    resources:
        mem_mb=subtract_mem_mb,
        runtime=config["subtract"]["runtime"],
    params:
        python=python_exe(),
        src=PACKAGE_ROOT,
        convolve=convolve_option,
    shell:
        "PYTHONPATH={params.src:q}${{PYTHONPATH:+:$PYTHONPATH}} "
        "{params.python:q} -m diffim subtract {input.template:q} {input.science:q} "
        "-o {output.diff:q} --kernel-out {output.kernel:q} --config {input.config:q} "
        "{params.convolve} --threads {threads} > {log:q} 2>&1"
