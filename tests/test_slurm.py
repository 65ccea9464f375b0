"""The demo workflow through the SLURM executor (snakemake-executor-plugin-slurm) on a real cluster.

Needs a SLURM cluster reachable with `sbatch`: in CI, `.ci/slurm.sh start` sets up a single-node
one (partition "debug", no accounting database) and exports DIFFIM_REQUIRE_SLURM=1, which turns
every reason to skip into a failure.  Elsewhere the test is skipped when `sbatch` is not on PATH.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "tests" / "profiles" / "slurm-local"
REQUIRED = os.environ.get("DIFFIM_REQUIRE_SLURM") == "1"


def _unavailable(reason):
    if REQUIRED:
        pytest.fail(f"DIFFIM_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def slurm():
    """Skip (or fail, under DIFFIM_REQUIRE_SLURM=1) unless SLURM and the plugin are usable."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "sinfo") if shutil.which(c) is None]
    if missing:
        _unavailable(f"SLURM commands not on PATH: {', '.join(missing)} (try .ci/slurm.sh start)")
    for module, package in (("snakemake", "snakemake"),
                            ("snakemake_executor_plugin_slurm",
                             "snakemake-executor-plugin-slurm")):
        if importlib.util.find_spec(module) is None:
            _unavailable(f"{package} is not installed (pip install -e '.[workflow]')")
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %a %t"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0 or " up " not in f" {proc.stdout} ":
        _unavailable(f"no SLURM partition is up: {proc.stdout.strip()} {proc.stderr.strip()}")


def _per_pair_rules(dry_run_output):
    """{rule: set of pairs} for the jobs with a `pair` wildcard in a dry-run listing."""
    rules, current = {}, None
    for line in dry_run_output.splitlines():
        m = re.match(r"\s*(?:local)?(?:rule|checkpoint) (\S+):\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.match(r"\s*wildcards: (.*)$", line)
        if m and current:
            found = re.search(r"(?:^|, )pair=([^,]+)", m.group(1))
            if found:
                rules.setdefault(current, set()).add(found.group(1).strip())
    return rules


def test_demo_through_slurm(slurm, tmp_path):
    # Same approach as test_workflow.py: run the default demo configuration (config/config.yaml)
    # in a copy of the repository, so jobs use the copied package and write only there.
    from tests.test_workflow import _copy_repo, _run_in

    repo = _copy_repo(tmp_path)

    # Rule names come from the workflow itself: every rule whose jobs have a {pair} wildcard
    # goes into group "pair", so each pair's chain runs as one SLURM job (separate pairs are
    # separate connected components, hence separate jobs).
    dry = _run_in(repo, "--dry-run", "--cores", "2")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    per_pair = _per_pair_rules(dry.stdout + dry.stderr)
    assert per_pair, "no jobs with a {pair} wildcard in the dry run:\n" + dry.stdout
    pairs = set().union(*per_pair.values())

    proc = _run_in(repo, "--profile", str(PROFILE), "--cores", "2",
                   "--groups", *(f"{rule}=pair" for rule in sorted(per_pair)), timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output

    # Jobs went through sbatch: the plugin reports each SLURM job id and its log; the cluster
    # keeps finished jobs for MinJobAge (600 s with .ci/slurm.sh), so scontrol still knows them.
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (.+?)\)", output)
    assert len({job_id for job_id, _ in submitted}) >= len(pairs), output
    slurm_logs = ""
    for job_id, log in submitted:
        info = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                              text=True, timeout=60)
        assert info.returncode == 0, f"scontrol show job {job_id}: {info.stderr}"
        assert "JobState=COMPLETED" in info.stdout and "ExitCode=0:0" in info.stdout, info.stdout
        assert f"WorkDir={repo}" in info.stdout, info.stdout
        # The profile keeps the logs of successful jobs: the job's own Snakemake ran the rules.
        slurm_logs += Path(log).read_text()
    for rule in per_pair:
        assert re.search(rf"^\s*(?:local)?rule {re.escape(rule)}:", slurm_logs, re.M), \
            f"rule {rule} ran in none of the SLURM jobs {[j for j, _ in submitted]}"

    # Every product the workflow asks for exists and is up to date ...
    again = _run_in(repo, "--dry-run", "--cores", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr
    # ... including a difference image per pair.
    from astropy.io import fits

    for pair in sorted(pairs):
        diffs = sorted((repo / "results" / pair).rglob("*diff*.fits"))
        assert diffs, f"no difference image under results/{pair}/\n{output}"
        with fits.open(diffs[0]) as hdul:
            assert any(h.data is not None and h.data.size for h in hdul), diffs[0]
