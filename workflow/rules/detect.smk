# Step 2: sep catalogs and PSF FWHMs of the science image and the warped template.


rule detect:
    input:
        image=detect_image,
        config=diffim_config_file(),
    output:
        sources=intermediate("results/{pair}/detect/{which}_sources.ecsv"),
    log:
        "logs/detect/{pair}_{which}.log",
    benchmark:
        "results/benchmarks/detect/{pair}_{which}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("detect")
    resources:
        mem_mb=step_mem_mb("detect"),
        runtime=step_runtime("detect"),
    params:
        diffim=diffim_command(),
        options=step_options("detect"),
    shell:
        "{params.diffim} detect {input.image:q} --which {wildcards.which} -o {output.sources:q} "
        "--config {input.config:q} --threads {threads} > {log:q} 2>&1"
