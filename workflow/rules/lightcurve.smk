# Survey target: forced-photometry light curves of chosen objects (light_curve.objects)
# through every pair's decorrelated difference image, with its PSF; the pairs share one template and the sheet has an
# `mjd` column.


rule light_curve:
    input:
        diffs=expand("results/{pair}/subtract/diff_decorrelated.fits", pair=PAIRS),
        psfs=expand("results/{pair}/subtract/psf_decorrelated.fits", pair=PAIRS),
        warped=expand("results/{pair}/warp/template.fits", pair=PAIRS),
        kernels=expand("results/{pair}/spatial/kernel.fits", pair=PAIRS),
    output:
        table="results/light_curves/{object}.ecsv",
        plot=report(
            "results/light_curves/{object}.png",
            caption="../report/light_curve.rst",
            category="Light curves",
            labels={"object": "{object}"},
        ),
    log:
        "logs/light_curve/{object}.log",
    benchmark:
        "results/benchmarks/light_curve/{object}.tsv"
    conda:
        "../../envs/diffim.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        diffim=diffim_command(),
        times=" ".join(row.get("mjd", "") for row in PAIRS.values()),
        position=object_position,
        frame=config["light_curve"]["frame"],
    shell:
        "{params.diffim} lightcurve --differences {input.diffs:q} --warped {input.warped:q} "
        "--kernels {input.kernels:q} --psfs {input.psfs:q} --times {params.times} --position {params.position} "
        "--frame {params.frame} -o {output.table:q} --plot {output.plot:q} "
        "--title {wildcards.object:q} > {log:q} 2>&1"
