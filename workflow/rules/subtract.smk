# Step 6: apply the kernel model: the PSF-matched template, the difference image, and the
# decorrelated difference with its PSF (DMTN-021; what photometry should use).


rule subtract:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        kernel="results/{pair}/spatial/kernel.fits",
        config=diffim_config_file(),
    output:
        diff="results/{pair}/subtract/diff.fits",
        matched="results/{pair}/subtract/matched.fits",
        decorrelated="results/{pair}/subtract/diff_decorrelated.fits",
        psf="results/{pair}/subtract/psf_decorrelated.fits",
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
        "-o {output.diff:q} --matched-out {output.matched:q} "
        "--decorrelated-out {output.decorrelated:q} --psf-out {output.psf:q} "
        "--config {input.config:q} "
        "--threads {threads} > {log:q} 2>&1"
