# Simulated demo inputs: only used when config/pairs.tsv names files under resources/demo/.


rule simulate_demo:
    output:
        template="resources/demo/{pair}_template.fits",
        science="resources/demo/{pair}_science.fits",
        stars="resources/demo/{pair}_stars.ecsv",
        transients="resources/demo/{pair}_transients.ecsv",
    log:
        "logs/simulate_demo/{pair}.log",
    benchmark:
        "results/benchmarks/simulate_demo/{pair}.tsv"
    localrule: True
    conda:
        "../../envs/diffim.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        diffim=diffim_command(),
        out_dir=output_dir,
        seed=demo_seed,
        size=config["demo"]["size"],
        n_stars=config["demo"]["n_stars"],
        n_transients=config["demo"]["n_transients"],
        template_fwhm=config["demo"]["template_fwhm"],
        science_fwhm=config["demo"]["science_fwhm"],
        fwhm_gradient=config["demo"]["fwhm_gradient"],
        psf=config["demo"]["psf"],
    shell:
        "{params.diffim} simulate --out-dir {params.out_dir:q} "
        "--prefix {wildcards.pair}_ --seed {params.seed} --size {params.size} "
        "--n-stars {params.n_stars} --n-transients {params.n_transients} "
        "--template-fwhm {params.template_fwhm} --science-fwhm {params.science_fwhm} "
        "--fwhm-gradient {params.fwhm_gradient} --psf {params.psf} > {log:q} 2>&1"
