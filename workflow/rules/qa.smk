# Step 7: diagnostic plots (in the Snakemake report) and quality metrics per pair.


rule qa:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        candidates="results/{pair}/select/candidates.ecsv",
        kernel="results/{pair}/spatial/kernel.fits",
        solutions="results/{pair}/spatial/solutions.fits",
        metadata="results/{pair}/spatial/metadata.json",
        diff="results/{pair}/subtract/diff.fits",
        matched="results/{pair}/subtract/matched.fits",
        config=diffim_config_file(),
    output:
        metrics="results/{pair}/qa/metrics.json",
        plots=report(
            directory("results/{pair}/qa/plots"),
            patterns=["{name}.png"],
            caption="../report/qa.rst",
            category="Quality assurance",
            subcategory="{pair}",
            labels={"pair": "{pair}", "plot": "{name}"},
        ),
    log:
        "logs/qa/{pair}.log",
    benchmark:
        "results/benchmarks/qa/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("qa")
    resources:
        mem_mb=step_mem_mb("qa"),
        runtime=step_runtime("qa"),
    params:
        diffim=diffim_command(),
        options=step_options("qa"),
    shell:
        "{params.diffim} qa {input.template:q} {input.science:q} --out-dir {output.plots:q} "
        "--metrics-out {output.metrics:q} --kernel {input.kernel:q} "
        "--solutions {input.solutions:q} --candidates {input.candidates:q} "
        "--metadata {input.metadata:q} --difference {input.diff:q} "
        "--matched {input.matched:q} --config {input.config:q} --threads {threads} "
        "> {log:q} 2>&1"
