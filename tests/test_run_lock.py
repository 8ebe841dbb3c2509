"""One run per run directory: the lock is taken first, names its holder, is released on any exit
and taken over once its holder is gone (same host: at once; other host: after the heartbeat goes
stale; an earlier attempt of the same Slurm job: at once)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import parity_flags
from harness import rundir
from harness.config import TrainConfig
from harness.errors import HarnessError
from harness.train import run

LOCK_FILE = ".lock"  # documented in docs/checkpoints.md; the tests plant and read it by that name


def RunLock(out):  # noqa: N802 (the class, looked up when called)
    return rundir.RunLock(out)


def plant_lock(out, age_s=0.0, **holder):
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
                                "started": "2031-01-02 03:04:05 +0000", "job": None, "attempt": "0", "token": "t0",
                                **holder}))
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))
    return lock


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_naming_the_holder_and_touches_nothing(tiny_model, parity_data, tmp_path, other_process):
    out = tmp_path / "run"
    plant_lock(out, pid=other_process.pid)
    with pytest.raises(HarnessError, match=rf"is in use by another run \(host {socket.gethostname()}, pid "
                                           rf"{other_process.pid}, started 2031-01-02 03:04:05 \+0000"):
        run(TrainConfig(**parity_flags(tiny_model, parity_data, out, max_steps=1)))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no config.json, no metrics: nothing written
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == other_process.pid  # still theirs


def test_the_lock_is_held_during_the_run_and_released_after(tiny_model, parity_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    original = rundir.prepare

    def prepare(*args, **kwargs):
        seen.append(json.loads((out / LOCK_FILE).read_text()))
        return original(*args, **kwargs)

    monkeypatch.setattr(rundir, "prepare", prepare)
    run(TrainConfig(**parity_flags(tiny_model, parity_data, out, max_steps=1)))
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert (out / "final").is_dir() and not (out / LOCK_FILE).exists()


def test_a_failed_start_releases_the_lock_and_leaves_no_folder(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(HarnessError, match="no such file"):
        run(TrainConfig(**parity_flags(tiny_model, tmp_path / "missing.jsonl", out)))
    assert not out.exists()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, capsys, other_process):
    other_process.kill()
    other_process.wait()
    out = tmp_path / "run"
    plant_lock(out, pid=other_process.pid)
    with RunLock(out) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.me["token"]
    assert f"process {other_process.pid} on this host has ended" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists()


def test_a_reused_pid_does_not_count_as_the_holder(tmp_path):
    out = tmp_path / "run"
    plant_lock(out, pid=os.getpid(), pid_start="1")  # our pid, but another process start time
    with RunLock(out):
        pass


@pytest.mark.parametrize("age_s, taken", [(10, False), (300 + 60, True)])
def test_a_holder_on_another_host_is_stale_only_after_its_heartbeat_stops(age_s, taken, tmp_path):
    assert rundir.LOCK_STALE_S == 300  # as documented
    out = tmp_path / "run"
    plant_lock(out, age_s=age_s, host="node-that-is-not-here", pid=1)
    if taken:
        with RunLock(out):
            pass
    else:
        with pytest.raises(HarnessError, match="host node-that-is-not-here, pid 1"):
            RunLock(out)


def test_a_requeued_slurm_attempt_takes_the_lock_of_the_attempt_slurm_ended(tmp_path, monkeypatch):
    out = tmp_path / "run"
    plant_lock(out, host="node-that-is-not-here", pid=1, job="4242", attempt="0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunLock(out):
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "5151")  # another job: the fresh lock of job 4242 holds
    plant_lock(out, host="node-that-is-not-here", pid=1, job="4242", attempt="0")
    with pytest.raises(HarnessError, match="Slurm job 4242"):
        RunLock(out)


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LOCK_BEAT_S", 0.1)
    out = tmp_path / "run"
    with RunLock(out) as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5


@pytest.mark.slow
def test_two_launched_runs_into_one_folder_then_a_kill_9(tiny_model, parity_data, tmp_path):
    """Real processes: while one run trains, a second into the same folder is refused (exit 2)
    naming it; once the first is killed with -9, the next run takes its lock over at once."""
    import faults
    from conftest import LAUNCHER_ENV_VARS, ROOT, as_argv, read_metrics

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    out = tmp_path / "run"
    argv = as_argv(parity_flags(tiny_model, parity_data, out, max_steps=3))
    first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_with_faults.py"), *argv],
                             env={**env, **faults.env(at="step", action="hang", step=2)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() or not read_metrics(out):  # step 1 done, hangs in step 2
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        train = [sys.executable, str(ROOT / "launch" / "train.py"), *argv, "--resume=auto"]
        second = subprocess.run(train, capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert [m["step"] for m in read_metrics(out)] == [1]  # the second wrote nothing
    finally:
        first.kill()
        first.communicate()
    third = subprocess.run(train, capture_output=True, text=True, timeout=300, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"process {first.pid} on this host has ended" in third.stderr
    assert (out / "final").is_dir() and not (out / LOCK_FILE).exists()
