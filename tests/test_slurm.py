"""The SLURM profile (workflow/profiles/slurm): what reaches `sbatch` through the real executor plugin and
stub SLURM commands, and the dry-run plans of the paper configs with the profile."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow/profiles/slurm"

# Stub SLURM commands (environment-probe.md §4). sbatch records its argv, starts the --wrap command in the
# background through `job` (as if it had been scheduled at once) and prints the job id, as `sbatch --parsable`
# does; `job` records RUNNING, then COMPLETED or FAILED. srun records its argv and runs the command after its
# options. sacct / squeue print the last state of every job as "<id>|<state>" (the plugin's --parsable2 and
# "%i|%T" formats). Paths are baked in: the plugin's job step removes SLURM_* variables from the environment.
SBATCH = """#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
opt = lambda name: argv[argv.index(name) + 1]
job = str(os.getpid())
wrap = next(a[len("--wrap="):] for a in argv if a.startswith("--wrap="))
env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOBID=job)
gpus = [a.split("=", 1)[1] for a in argv if a.startswith("--gpus=")]
if gpus:
    env["SLURM_GPUS"] = gpus[0]
log = opt("--output").replace("%j", job)
os.makedirs(os.path.dirname(log), exist_ok=True)
with open({jobs!r}, "a") as f:
    f.write(json.dumps({{"id": job, "state": "RUNNING"}}) + "\\n")
subprocess.Popen([sys.executable, {job_script!r}, job, wrap], cwd=opt("-D"), env=env,
                 stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                 start_new_session=True)
print(job)
"""
JOB = """#!{python}
import json, subprocess, sys
rc = subprocess.call(sys.argv[2], shell=True)
with open({jobs!r}, "a") as f:
    f.write(json.dumps({{"id": sys.argv[1], "state": "COMPLETED" if rc == 0 else "FAILED"}}) + "\\n")
"""
SRUN = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({sruns!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
i = next(i for i, a in enumerate(argv) if not a.startswith("-"))
os.execvp(argv[i], argv[i:])
"""
SACCT = """#!{python}
import json, os
states = {{}}
for line in open({jobs!r}).read().splitlines() if os.path.exists({jobs!r}) else []:
    job = json.loads(line)
    states[job["id"]] = job["state"]
for job, state in states.items():
    print(job + "|" + state)
"""
SHELL_STUBS = {
    "sacctmgr": "echo testacct",                  # the plugin validates -A against `sacctmgr list user`
    "scontrol": "echo 'MinJobAge = 300 sec'",
    "sinfo": "echo PARTITION; echo 'main*'",
}

# A workflow shaped like ours: rule names from the profile, resources as in workflow/rules/*.smk.
SNAKEFILE = """
rule all:
    input: "store.txt", "model.txt"

rule build_store:        # a CPU job
    output: "store.txt"
    shell: "echo store > {output}"

rule train_ldm:
    output: "model.txt"
    threads: 2
    resources: gpu=1, mem_mb=32000, runtime=2880
    shell: "echo model > {output}"
"""


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    paths = dict(python=sys.executable, calls=str(state / "sbatch.jsonl"), sruns=str(state / "srun.jsonl"),
                 jobs=str(state / "jobs.jsonl"), job_script=str(bin_dir / "job"))
    scripts = {"sbatch": SBATCH, "job": JOB, "srun": SRUN, "sacct": SACCT, "squeue": SACCT}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text.format(**paths))
    for name, line in SHELL_STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    return bin_dir, state


def _snakemake(args, cwd, path_prefix=None, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        del env[var]
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _submit(tmp_path: Path, profile: Path) -> dict[str, list[str]]:
    """Run the tiny workflow through the SLURM executor with the stubs; returns each rule's sbatch argv."""
    bin_dir, state = _stubs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "Snakefile").write_text(SNAKEFILE)
    # Account and partition as README.md tells users to pass them (with the fallbacks the flag replaces).
    # The plugin polls sacct after 5 s, and waits 10 s longer after each poll that finds nothing finished.
    res = _snakemake(["--profile", str(profile), "--default-resources", "slurm_account=testacct",
                      "slurm_partition=main", "runtime=60", "mem_mb=4000",
                      "--slurm-init-seconds-before-status-checks", "5"], cwd=work, path_prefix=bin_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("store", "model"):
        assert (work / f"{name}.txt").read_text().strip() == name      # the jobs ran, through sbatch and srun
    calls = [json.loads(l) for l in (state / "sbatch.jsonl").read_text().splitlines()]
    by_rule = {c[c.index("--comment") + 1].removeprefix("rule_"): c for c in calls}
    assert sorted(by_rule) == ["build_store", "train_ldm"]
    sruns = [json.loads(l) for l in (state / "srun.jsonl").read_text().splitlines()]
    assert sum("--gpus=1" in s for s in sruns) == 1                    # the job step asks for the GPU too
    return by_rule


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slow        # ~15 s on an idle 2-core machine, 30 s on a busy one (two nested snakemake per job)
def test_sbatch_gets_gpu_cpu_time_and_memory_flags_from_the_profile(tmp_path):
    by_rule = _submit(tmp_path, PROFILE)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    argv, want = by_rule["train_ldm"], profile["train_ldm"]
    assert f"--gpus={want['gpu']}" in argv and f"--cpus-per-gpu={want['cpus_per_gpu']}" in argv
    assert _flag(argv, "-t") == str(want["runtime"]) and _flag(argv, "--mem") == str(want["mem_mb"])
    assert not any(a.startswith("--cpus-per-task") for a in argv)
    assert _flag(argv, "--mem") == "128000"                            # the profile's value, not the rule's
    cpu = by_rule["build_store"]
    assert "--cpus-per-task=1" in cpu and not any(a.startswith("--gpus") for a in cpu)
    assert _flag(cpu, "-t") == str(profile["build_store"]["runtime"])
    for argv in by_rule.values():
        assert _flag(argv, "-A") == "testacct" and _flag(argv, "-p") == "main"
        assert not any(a.startswith("--gres") for a in argv)


@pytest.mark.slow
def test_gpu_model_and_partition_edited_in_the_profile_reach_sbatch(tmp_path):
    """README.md's recipe: uncomment `gpu_model` and `slurm_partition` in the profile's `_gpu_job` block."""
    profile = tmp_path / "profile"
    shutil.copytree(PROFILE, profile)
    text = (profile / "config.yaml").read_text()
    for line in ("# gpu_model: a100", "# slurm_partition: gpu"):
        assert line in text
    text = text.replace("# gpu_model: a100", "gpu_model: h100")
    text = text.replace("# slurm_partition: gpu", "slurm_partition: gpu")
    (profile / "config.yaml").write_text(text)
    by_rule = _submit(tmp_path, profile)
    assert "--gpus=h100:1" in by_rule["train_ldm"] and _flag(by_rule["train_ldm"], "-p") == "gpu"
    assert _flag(by_rule["build_store"], "-p") == "main"


def test_profile_entries_are_complete_and_slurm_extra_is_clean():
    from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options

    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert cfg["executor"] == "slurm"
    forbidden = get_forbidden_slurm_options()
    for rule, res in cfg["set-resources"].items():
        if rule.startswith("_"):
            continue
        assert {"runtime", "mem_mb"} <= set(res), rule
        if res.get("gpu"):
            assert res.get("cpus_per_gpu", 0) >= 1, rule
        extra = res.get("slurm_extra", "")
        assert not [p for p in forbidden if re.search(p, extra)], (rule, extra)
    # The default-profile trap (environment-probe.md §4): Snakemake loads profiles/default/ next to the root
    # Snakefile (or in the working directory) by itself, and its set-resources would replace this profile's.
    for d in (ROOT / "profiles/default", ROOT / "workflow/profiles/default"):
        for f in d.glob("*.yaml"):
            assert "set-resources" not in (yaml.safe_load(f.read_text()) or {}), f


# ---------------------------------------------------------------------------------------------------------
# Acceptance: `snakemake -n --profile workflow/profiles/slurm --configfile <paper config>` plans the DAG.

def _rules_with_output() -> set[str]:
    """Rules of workflow/rules/*.smk that produce files (aggregate target rules have only inputs)."""
    out = set()
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        blocks = re.split(r"^\s*rule (\w+):\s*$", smk.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            if re.search(r"^\s+output:", body, flags=re.M):
                out.add(name)
    return out


def _jobs(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, resources line) of every job a dry run prints."""
    pattern = r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$"
    return re.findall(pattern, dry_run_output, flags=re.M)


@pytest.mark.parametrize("base, ext", [("brca.yaml", "svs"), ("naip.yaml", "tif")])
def test_dry_run_with_the_profile_plans_the_whole_dag(tmp_path, base, ext):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        (slides / f"S{i}.{ext}").touch()
    cfg = yaml.safe_load((ROOT / "workflow/configs" / base).read_text())
    cfg["dataset"]["inputs"] = f"{slides}/*.{ext}"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    vq = tmp_path / cfg["models"]["vq_checkpoint"]                    # the converted CompVis vq-f4 weights
    vq.parent.mkdir(parents=True)
    vq.touch()
    if cfg["eval"]["mil"].get("labels"):                              # the MIL labels (`zoomldm fetch labels`)
        labels = tmp_path / cfg["eval"]["mil"]["labels"]
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text("slide,label\n")
    common = ["--snakefile", str(ROOT / "Snakefile"), "--profile", str(PROFILE),
              "--configfile", "config.yaml"]
    res = _snakemake(["-n", *common], cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    jobs = _jobs(out)
    planned = {rule for rule, _ in jobs}
    listed = set(_snakemake(["--list-rules", *common], cwd=tmp_path).stdout.split())
    assert planned >= (listed & _rules_with_output()), "rules left out of the plan"
    n_mags = len(cfg["train"]["single_scale"]["magnifications"])
    assert sum(r == "extract_slide" for r, _ in jobs) == 3
    assert sum(r == "train_single_scale" for r, _ in jobs) == n_mags
    assert {"build_store", "encode_latents", "train_ldm", "train_cdm", "all"} <= planned
    assert {"fid_ref", "eval_fid", "eval_large", "eval_sr", "train_ldm_sr", "train_controlnet", "report_tables",
            "report_figures"} <= planned                              # evaluation and report are planned too
    assert ("eval_mil" in planned) == bool(cfg["eval"]["mil"]["features"])
    # Every GPU rule carries its GPU request; the profile's entries carry its CPU, time and memory too.
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    gpu_rules = {r for r, res in profile.items() if res.get("gpu") and not r.startswith("_")}
    assert {"extract_slide", "encode_latents", "train_ldm", "train_cdm"} <= gpu_rules
    for rule, resources in jobs:
        res = dict(kv.split("=", 1) for kv in resources.split(", "))
        if rule in profile and not rule.startswith("_"):
            want = profile[rule]
            assert res["runtime"] == str(want["runtime"]) and res["mem_mb"] == str(want["mem_mb"]), rule
            if rule in gpu_rules:
                assert res["gpu"] == "1" and res["cpus_per_gpu"] == str(want["cpus_per_gpu"]), rule
        if rule in gpu_rules:
            assert "gpu" in res, rule
