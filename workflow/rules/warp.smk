# Step 1: the settings file every step reads, and the template on the science grid.


rule diffim_config:
    output:
        yaml="results/diffim_config.yaml",
    log:
        "logs/diffim_config.log",
    localrule: True
    params:
        settings=config["diffim"],
    run:
        write_yaml(params.settings, output.yaml)


rule warp:
    input:
        template=get_template,
        science=get_science,
        config=diffim_config_file(),
    output:
        warped=intermediate("results/{pair}/warp/template.fits"),
    log:
        "logs/warp/{pair}.log",
    benchmark:
        "results/benchmarks/warp/{pair}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: step_threads("warp")
    resources:
        mem_mb=step_mem_mb("warp"),
        runtime=step_runtime("warp"),
    params:
        diffim=diffim_command(),
        options=step_options("warp"),
        no_warping="" if config["warp"]["do_warping"] else "--no-warping",
    shell:
        "{params.diffim} warp {input.template:q} {input.science:q} -o {output.warped:q} "
        "--config {input.config:q} {params.no_warping} --threads {threads} > {log:q} 2>&1"
