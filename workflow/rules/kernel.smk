# Steps 3-5: kernel candidates, per-candidate fits, the spatial kernel and background model.


rule select:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        template_sources="results/{pair}/detect/template_sources.ecsv",
        science_sources="results/{pair}/detect/science_sources.ecsv",
        config=diffim_config_file(),
    output:
        candidates=intermediate("results/{pair}/select/candidates.ecsv"),
    log:
        "logs/select/{pair}.log",
    benchmark:
        "results/benchmarks/select/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("select")
    resources:
        mem_mb=step_mem_mb("select"),
        runtime=step_runtime("select"),
    params:
        diffim=diffim_command(),
        options=step_options("select"),
        convolve=convolve_option,
    shell:
        "{params.diffim} select {input.template:q} {input.science:q} "
        "--template-sources {input.template_sources:q} "
        "--science-sources {input.science_sources:q} -o {output.candidates:q} "
        "--config {input.config:q} {params.convolve} --threads {threads} > {log:q} 2>&1"


rule solve:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        candidates="results/{pair}/select/candidates.ecsv",
        config=diffim_config_file(),
    output:
        solutions=intermediate("results/{pair}/solve/solutions.fits"),
    log:
        "logs/solve/{pair}.log",
    benchmark:
        "results/benchmarks/solve/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("solve")
    resources:
        mem_mb=step_mem_mb("solve"),
        runtime=step_runtime("solve"),
    params:
        diffim=diffim_command(),
        options=step_options("solve"),
    shell:
        "{params.diffim} solve {input.template:q} {input.science:q} "
        "--candidates {input.candidates:q} -o {output.solutions:q} "
        "--config {input.config:q} --threads {threads} > {log:q} 2>&1"


rule spatial:
    input:
        template="results/{pair}/warp/template.fits",
        science=get_science,
        candidates="results/{pair}/select/candidates.ecsv",
        solutions="results/{pair}/solve/solutions.fits",
        config=diffim_config_file(),
    output:
        kernel="results/{pair}/spatial/kernel.fits",
        solutions="results/{pair}/spatial/solutions.fits",
        metadata="results/{pair}/spatial/metadata.json",
    log:
        "logs/spatial/{pair}.log",
    benchmark:
        "results/benchmarks/spatial/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("spatial")
    resources:
        mem_mb=step_mem_mb("spatial"),
        runtime=step_runtime("spatial"),
    params:
        diffim=diffim_command(),
        options=step_options("spatial"),
    shell:
        "{params.diffim} spatial {input.template:q} {input.science:q} "
        "--candidates {input.candidates:q} --solutions {input.solutions:q} "
        "-o {output.kernel:q} --solutions-out {output.solutions:q} "
        "--metadata-out {output.metadata:q} --config {input.config:q} --threads {threads} "
        "> {log:q} 2>&1"
