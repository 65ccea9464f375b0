# Step 6: apply the kernel model: the PSF-matched template and the difference image.


rule subtract:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        kernel="results/{pair}/spatial/kernel.fits",
        config=diffim_config_file(),
    output:
        diff="results/{pair}/subtract/diff.fits",
        matched="results/{pair}/subtract/matched.fits",
    log:
        "logs/subtract/{pair}.log",
    benchmark:
        "results/benchmarks/subtract/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("subtract")
    resources:
        mem_mb=step_mem_mb("subtract"),
        runtime=step_runtime("subtract"),
    params:
        diffim=diffim_command(),
        options=step_options("subtract"),
    shell:
        "{params.diffim} subtract {input.template:q} {input.science:q} --kernel {input.kernel:q} "
        "-o {output.diff:q} --matched-out {output.matched:q} --config {input.config:q} "
        "--threads {threads} > {log:q} 2>&1"
