"""Checkpoints: atomic commit under kill -9, bitwise resume, signals, NaN guard, export, hangs.

Resumed runs are compared with uninterrupted ones bit for bit (fp32, CPU, deterministic):
per-step losses and final weights. Faults come from tests/faults.py, armed from outside the
harness: in-process through monkeypatch, in launched processes through tests/train_with_faults.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import faults
from conftest import BIN, LAUNCHER_ENV_VARS, ROOT, as_argv, launch, launch_ok, parity_flags, read_metrics, train_losses
from harness import checkpoint, rundir
from harness.config import TrainConfig
from harness.dist import DistInfo
from harness.errors import HarnessError, RequeueRequested, TrainingAborted
from harness.preflight import preflight
from harness.train import run

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SECRET = "sk-live-DO-NOT-LEAK-4242"
WITH_FAULTS = ROOT / "tests" / "train_with_faults.py"


def ckpt_flags(model, data, out, **overrides):
    return parity_flags(model, data, out, **{"max_steps": 8, "save_steps": 2, "keep_last": 2, **overrides})


def final_weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_run(out, reference_out):
    """Bitwise: the same per-step losses and the same final weights."""
    assert train_losses(out) == train_losses(reference_out)
    ref = final_weights(reference_out)
    got = final_weights(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def launch_with_fault(fault: dict, launcher, nproc, flags, env=None):
    return launch(launcher, nproc, flags, script=WITH_FAULTS, env={**faults.env(**fault), **(env or {})})


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, parity_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch_ok("python", 1, as_argv(ckpt_flags(tiny_model, parity_data, out)))
    return out


@pytest.mark.slow
def test_periodic_checkpoints_retention_and_latest(uninterrupted):
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-6", "step-8"]  # keep_last 2
    assert (root / "latest").read_text().strip() == "step-8"
    manifest, why = checkpoint.verify(root / "step-8")
    assert why == "" and manifest["step"] == 8 and manifest["world_size"] == 1 and manifest["zero_stage"] == 2
    state = json.loads((root / "step-8" / checkpoint.STATE).read_text())
    assert state["step"] == 8 and state["micro_step"] == 8 and state["epoch"] == 0 and state["rows_into_epoch"] == 32
    assert state["tokens_seen"] == read_metrics(uninterrupted)[-1]["tokens"]
    assert state["best"] == {"metric": "eval/loss", "value": None, "step": None, "evals_without_gain": 0}  # no eval data
    assert {"python", "numpy", "torch"} <= json.loads((root / "step-8" / "rng-rank0.json").read_text()).keys()
    assert (root / "step-8" / "hf" / "config.json").exists() and (root / "step-8" / "hf" / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", faults.SAVE_STAGES)
def test_kill_at_each_save_stage_then_resume_is_bitwise(stage, uninterrupted, tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    flags = as_argv(ckpt_flags(tiny_model, parity_data, out))
    crashed = launch_with_fault(dict(at=stage, action="crash", step=4), "python", 1, flags)
    assert crashed.returncode == -signal.SIGKILL
    newest = checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None)
    assert newest.name == ("step-4" if stage == "point_latest" else "step-2")
    resumed = launch_ok("python", 1, flags + ["--resume=auto"])
    assert f"resumed from {newest}" in resumed.stdout
    assert_same_run(out, uninterrupted)
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_kill_twice_mid_epoch_resumes_on_the_same_rows(uninterrupted, tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    flags = as_argv(ckpt_flags(tiny_model, parity_data, out))
    for crash_step in (4, 7):  # steps 3 and 6 were checkpointed at 2 and 6: work is redone from there
        crashed = launch_with_fault(dict(at="step", action="crash", step=crash_step), "python", 1,
                                    flags + ["--resume=auto"])
        assert crashed.returncode == -signal.SIGKILL
    launch_ok("python", 1, flags + ["--resume=auto"])
    # Every step's loss equals the uninterrupted run's: each step saw the same rows and weights.
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_two_ranks_zero3_rank_killed_mid_save_then_resume_and_export(tiny_model, parity_data, tmp_path):
    flags = dict(ds_config="zero3", micro_batch_size=1, grad_accum_steps=2)
    ref = tmp_path / "ref"
    launch_ok("torchrun", 2, as_argv(ckpt_flags(tiny_model, parity_data, ref, **flags)))
    out = tmp_path / "run"
    argv = as_argv(ckpt_flags(tiny_model, parity_data, out, **flags))
    secret = {"HARNESS_TEST_SECRET": SECRET}
    crashed = launch_with_fault(dict(at="write_rank_files", action="crash", rank=1, step=6), "torchrun", 2, argv,
                                env=secret)
    assert crashed.returncode != 0
    assert checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None).name == "step-4"
    launch_ok("torchrun", 2, argv + ["--resume=auto"], env=secret)
    assert_same_run(out, ref)

    # Export the 2-rank ZeRO-3 checkpoint in one process; it must equal final/ exactly.
    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(out / "checkpoints" / "step-8"),
                           str(exported)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported)
    final = final_weights(out)
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())

    # No secret from the environment lands anywhere in the run directory.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (read from /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if ppid == launcher_pid and b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry)
    return ranks


@pytest.mark.slow
def test_signal_saves_exits_75_and_resumes_bitwise(tiny_model, parity_data, tmp_path):
    flags = dict(max_steps=200, save_steps=0, ds_config="zero2", micro_batch_size=2)
    ref = tmp_path / "ref"
    launch_ok("torchrun", 2, as_argv(parity_flags(tiny_model, parity_data, ref, **flags)))

    out = tmp_path / "run"
    argv = as_argv(parity_flags(tiny_model, parity_data, out, **flags))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(ROOT / "launch" / "train.py"),
                             *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)  # one rank is enough: all ranks agree to stop
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "exitcode  : 75" in stderr or "exitcode: 75" in stderr, stderr[-3000:]
    saved = checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None)
    assert saved is not None and 3 <= int(saved.name.split("-")[1]) < 200
    launch_ok("torchrun", 2, argv + ["--resume=auto"])
    assert_same_run(out, ref)


@pytest.mark.slow
def test_plain_process_exits_75_on_sigterm(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"),
                             *as_argv(parity_flags(tiny_model, parity_data, out, max_steps=400))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == RequeueRequested.exit_code == 75
    assert checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None) is not None


def test_nan_step_is_skipped_with_weights_optimizer_and_schedule_unchanged(tiny_model, parity_data, tmp_path,
                                                                           monkeypatch):
    common = dict(lr_schedule="constant", warmup_steps=10)
    clean = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "clean", max_steps=2, **common)))
    faults.install(monkeypatch.setattr, nan_at_steps=(3,))
    poisoned = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path / "nan", max_steps=3, **common)))
    a, b = clean.engine.module.state_dict(), poisoned.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 changed no weight
    opt_a, opt_b = clean.engine.optimizer.optimizer.state, poisoned.engine.optimizer.optimizer.state
    for sa, sb in zip(opt_a.values(), opt_b.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert poisoned.engine.lr() == clean.engine.lr()  # the schedule did not advance
    metrics = read_metrics(poisoned.output_dir)
    skipped = [m for m in metrics if m.get("skipped_step")]
    assert len(skipped) == 1 and skipped[0]["step"] == 3 and len(skipped[0]["sample_rows"]) == 4


def test_consecutive_bad_steps_abort_naming_the_last_good_checkpoint(tiny_model, parity_data, tmp_path, monkeypatch):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    faults.install(monkeypatch.setattr, nan_at_steps=(3, 4))
    out = tmp_path / "run"
    with pytest.raises(TrainingAborted, match=r"2 consecutive .* \(last at step 4\).* Newest checkpoint that verifies "
                                              r"by content: .*step-2") as aborted:
        run(TrainConfig(**ckpt_flags(tiny_model, parity_data, out, max_bad_steps=2)))
    # The abort closed what the run opened, even while its frames live on in the traceback: the
    # process has its own signal handlers back and holds no file of the run directory open.
    assert aborted.tb is not None
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert not [path for path in open_files() if path.startswith(str(out))]
    assert [m["step"] for m in read_metrics(out) if m.get("skipped_step")] == [3, 4]


def open_files() -> list[str]:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since listdir
            pass
    return paths


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_within_the_timeout_naming_it(tiny_model, parity_data, tmp_path):
    start = time.time()
    proc = launch_with_fault(dict(at="step", action="hang", rank=1, step=3), "torchrun", 2,
                             as_argv(parity_flags(tiny_model, parity_data, tmp_path / "run", collective_timeout_s=10)))
    assert proc.returncode != 0 and time.time() - start < 10 + 60
    assert "lagging: rank 1 (last at step 2)" in proc.stderr and "at step 3" in proc.stderr


@pytest.mark.slow
def test_full_disk_during_save_is_a_clear_error_and_keeps_earlier_checkpoints(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    proc = launch_with_fault(dict(at="write_rank_files", action="enospc", step=4), "python", 1,
                             as_argv(ckpt_flags(tiny_model, parity_data, out)))
    assert proc.returncode == 2
    assert "saving the checkpoint of step 4 failed" in proc.stderr and "No space left on device" in proc.stderr
    assert checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None).name == "step-2"
    assert not (out / "checkpoints" / "step-4.tmp").exists()


@pytest.mark.slow
def test_corrupted_checkpoints_are_never_resumed(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shard = next((out / "checkpoints" / "step-8" / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    warnings = []
    assert checkpoint.newest_verified(out / "checkpoints", warn=warnings.append).name == "step-6"
    assert "step-8" in warnings[0] and "bytes, the manifest says" in warnings[0]
    with pytest.raises(HarnessError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(out / "checkpoints" / "step-8"), out)
    (out / "checkpoints" / "step-6" / checkpoint.MANIFEST).unlink()
    assert checkpoint.newest_verified(out / "checkpoints", warn=warnings.append) is None
    assert "no manifest" in warnings[-1]


def test_retention_never_counts_unverified_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        folder = root / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "w").write_text("x")
        if step != 6:
            checkpoint.write_json(folder / checkpoint.MANIFEST, {"files": {"w": 1}})
    (root / "step-8.tmp").mkdir()
    checkpoint.prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # step-6 is unverified, not kept-count


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(ds_config="zero3"), "ZeRO stage 2, this run uses 3"),
    (dict(seed=4), "the seed differs"),
    (dict(micro_batch_size=2), "global batch size differs"),
])
def test_resume_refuses_incompatible_runs_before_touching_state(change, message, uninterrupted, tiny_model, parity_data):
    flags = ckpt_flags(tiny_model, parity_data, uninterrupted, resume="auto", **change)
    with pytest.raises(HarnessError, match=message):
        preflight(TrainConfig(**flags), CPU1)


@pytest.mark.slow
def test_resume_refuses_another_model(uninterrupted, tiny_model, parity_data, tmp_path):
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(HarnessError, match="another model"):
        preflight(TrainConfig(**ckpt_flags(other, parity_data, uninterrupted, resume="auto")), CPU1)


def test_resume_path_that_is_not_a_checkpoint(tiny_model, parity_data, tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(HarnessError, match="not a complete checkpoint: no manifest"):
        preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, tmp_path / "run", resume=str(tmp_path / "junk"))), CPU1)
    with pytest.raises(HarnessError, match="no such folder"):
        preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, tmp_path / "run", resume=str(tmp_path / "nope"))), CPU1)


def test_no_room_for_keep_last_is_refused(tiny_model, parity_data, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(HarnessError, match="--save_steps 2 with --keep_last 2 needs about .* 976.6 KiB free"):
        preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, tmp_path / "run")), CPU1)


def test_checkpoint_room_counts_optimizer_state_only_for_trained_parameters(tiny_model, parity_data, tmp_path,
                                                                            monkeypatch):
    # --lora trains adapters only: the frozen base weights are saved in the module state (4 bytes
    # each in fp32) but have no fp32 master copy or Adam moments (16 bytes for a trained one).
    from transformers import AutoConfig

    from harness import model

    lora = dict(lora=True, lora_r=4, lora_targets="q_proj,v_proj")
    n_params = model.count_parameters(str(tiny_model))
    adapters = model.lora_parameters(AutoConfig.from_pretrained(tiny_model), lora["lora_targets"], 4, False)
    kept = 3  # 8 steps, a save every 2, keep_last 2: the newest 2 plus the one being written
    need = kept * (16 * adapters + 4 * n_params)
    assert need < kept * 16 * n_params / 3
    free = int(need * 1.01)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, tmp_path / "run", **lora)), CPU1)
    with pytest.raises(HarnessError, match="needs about"):
        preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, tmp_path / "run")), CPU1)


@pytest.mark.slow
def test_resume_auto_without_checkpoint_restarts_an_unfinished_run_but_keeps_a_finished_one(uninterrupted, tmp_path):
    flags = dict(model=str(uninterrupted / "final"), output_dir=str(uninterrupted), resume="auto")
    with pytest.raises(HarnessError, match="is not empty"):
        preflight(TrainConfig(**{**flags, "resume": ""}), CPU1)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text(json.dumps({"harness_version": "0.1.0"}))
    rundir.check_output_dir(crashed, overwrite=False, resume="auto", resume_from=None)  # no error: start again
    finished = tmp_path / "finished"
    shutil.copytree(crashed, finished)
    (finished / "final").mkdir()
    with pytest.raises(HarnessError, match="is not empty"):
        rundir.check_output_dir(finished, overwrite=False, resume="auto", resume_from=None)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_resume_on_another_world_size_through_universal_checkpoint(ds_config, tiny_model, parity_data, tmp_path):
    """2 ranks write, 1 rank resumes (same global batch): the run continues as the 2-rank one did,
    to fp32 rounding (1 and 2 ranks reduce gradients in a different order)."""
    two = tmp_path / "two"
    flags = dict(ds_config=ds_config, keep_last=0)
    launch_ok("torchrun", 2, as_argv(ckpt_flags(tiny_model, parity_data, two, micro_batch_size=2, **flags)))
    one = tmp_path / "one"
    shutil.copytree(two, one)
    for later in ("checkpoints/step-6", "checkpoints/step-8", "final"):
        shutil.rmtree(one / later)
    result = run(TrainConfig(**ckpt_flags(tiny_model, parity_data, one, micro_batch_size=4, resume="auto", **flags)))
    assert (one / "checkpoints" / "step-4" / "ds_universal").is_dir()
    assert train_losses(one) == pytest.approx(train_losses(two), abs=1e-5)
    ref = final_weights(two)
    assert all(torch.allclose(v, ref[k], atol=1e-5) for k, v in final_weights(one).items())
    assert result.losses == pytest.approx(train_losses(two)[4:], abs=1e-5)


# -- nothing is published from non-finite weights -------------------------------------------------

def test_non_finite_weights_are_never_checkpointed_or_published(tiny_model, parity_data, tmp_path, monkeypatch):
    faults.install(monkeypatch.setattr, nan_weights_at_steps=(4,))
    out = tmp_path / "run"
    with pytest.raises(TrainingAborted, match=r"NaN or Inf after step 4 \(model.embed_tokens.weight\); checkpoint "
                                              r"step-4 was not written. Newest checkpoint that verifies: .*step-2") as err:
        run(TrainConfig(**ckpt_flags(tiny_model, parity_data, out)))
    assert err.value.exit_code == 3
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")] == ["step-2"]
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def test_non_finite_weights_never_become_final(tiny_model, parity_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)  # what a user may still have from before: kept as it was
    (out / "config.json").write_text(json.dumps({"harness_version": "0.1.0"}))
    faults.install(monkeypatch.setattr, nan_weights_at_steps=(2,))
    with pytest.raises(TrainingAborted, match=r"final was not written"):
        run(TrainConfig(**parity_flags(tiny_model, parity_data, out, max_steps=2, overwrite=True)))
    assert not (out / "final").exists() and not list(out.glob("final*"))  # --overwrite emptied it; nothing new


@pytest.mark.slow
def test_non_finite_weights_on_one_zero3_rank_stop_every_rank(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    proc = launch_with_fault(dict(nan_weights_at_steps=[2], rank=1), "torchrun", 2,
                             as_argv(parity_flags(tiny_model, parity_data, out, max_steps=2, ds_config="zero3",
                                                  micro_batch_size=2)))
    assert proc.returncode != 0
    assert proc.stderr.count("error: the weights hold NaN or Inf") == 2, proc.stderr[-3000:]  # both ranks agree
    assert "exitcode  : 3" in proc.stderr or "exitcode: 3" in proc.stderr
    assert not (out / "final").exists()


# -- checkpoints verified by content --------------------------------------------------------------

def fake_checkpoint(root, step, payload=b"weights" * 1000):
    """A committed checkpoint folder with a manifest, hashed the way save() hashes."""
    tmp = root / f"step-{step}.tmp"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "shard.pt").write_bytes(payload)
    digests = checkpoint.fsync_tree(tmp, lambda path: True)
    checkpoint.write_manifest(tmp, step, 2, "fp", 1, digests)
    checkpoint.commit(tmp, root / f"step-{step}")
    return root / f"step-{step}"


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: the size check cannot see it


def test_a_checkpoint_changed_without_changing_its_size_fails_its_content_check(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 4)
    flip_a_byte(newest / "ds" / "shard.pt")
    assert checkpoint.verify(newest)[1] == ""  # sizes still match
    warnings = []
    assert checkpoint.newest_verified(root, warn=warnings.append, content=True).name == "step-2"
    assert "step-4" in warnings[0] and "ds/shard.pt does not match its content hash" in warnings[0]
    with pytest.raises(HarnessError, match="the checkpoint is corrupt: ds/shard.pt does not match"):
        checkpoint.resolve_resume(str(newest), tmp_path, content=True)


def test_the_nan_abort_never_names_a_corrupt_checkpoint(tmp_path):
    from harness.metrics import MetricsLogger
    from harness.train import BadStepGuard

    root = tmp_path / "checkpoints"
    flip_a_byte(fake_checkpoint(root, 2) / "ds" / "shard.pt")
    guard = BadStepGuard(1, root, lambda step: [])
    with pytest.raises(TrainingAborted, match="Newest checkpoint that verifies by content: none"):
        guard.check(3, False, float("nan"), MetricsLogger(tmp_path, False, 3))


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_corrupt_checkpoint(uninterrupted, tiny_model, parity_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    flip_a_byte(next((out / "checkpoints" / "step-8" / "ds").glob("*optim_states.pt")))
    setup = preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, out, resume="auto")), CPU1)
    assert setup.resume_from.name == "step-6"
    printed = capsys.readouterr().out
    assert "warning: ignoring checkpoint" in printed and "step-8" in printed and "does not match its content hash" in printed


# -- resume refuses a changed run, records an allowed change ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(lr=2e-3), r"--lr is 0.002, the checkpoint's run had 0.001"),
    (dict(weight_decay=0.1, adam_beta2=0.99), r"--weight_decay is 0.1, the checkpoint's run had 0.0\n  --adam_beta2 is 0.99"),
    (dict(lr_schedule="cosine", max_steps=12), r"the run now has 12 steps, the checkpoint's run had 8, and the cosine"),
    (dict(max_grad_norm=0.5, warmup_steps=2), r"--warmup_steps is 2, .*\n  --max_grad_norm is 0.5, .*\n  the filled "
                                              r"DeepSpeed config differs in gradient_clipping"),
    (dict(lora=True), r"--lora is True"),
])
def test_resume_refuses_a_flag_that_changes_the_run(change, message, uninterrupted, tiny_model, parity_data):
    flags = ckpt_flags(tiny_model, parity_data, uninterrupted, resume="auto", **change)
    with pytest.raises(HarnessError, match=f"cannot resume from .*step-8: this run is not the one it saved:\n  .*{message}"):
        preflight(TrainConfig(**flags), CPU1)


@pytest.mark.slow
def test_resume_records_the_flags_allowed_to_change(uninterrupted, tiny_model, parity_data):
    # The checkpoint's run has the default cosine schedule, so its length must stay; these change
    # when and how the same computation runs.
    flags = ckpt_flags(tiny_model, parity_data, uninterrupted, resume="auto", save_steps=4, keep_last=5, log_every=2,
                       micro_batch_size=2, grad_accum_steps=2)
    setup = preflight(TrainConfig(**flags), CPU1)
    (entry,) = setup.resolved()["changed_on_resume"]
    assert entry["step"] == 8 and entry["resumed_from"].endswith("step-8")
    assert entry["changes"] == {"save_steps": [2, 4], "keep_last": [2, 5], "log_every": [1, 2],
                                "micro_batch_size": [4, 2], "grad_accum_steps": [1, 2]}


@pytest.mark.slow
def test_a_longer_constant_schedule_may_resume(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    launch_ok("python", 1, as_argv(ckpt_flags(tiny_model, parity_data, out, lr_schedule="constant", max_steps=4)))
    setup = preflight(TrainConfig(**ckpt_flags(tiny_model, parity_data, out, lr_schedule="constant", max_steps=6,
                                               resume="auto")), CPU1)
    assert setup.resolved()["changed_on_resume"][0]["changes"] == {"max_steps": [4, 6], "total_steps": [4, 6]}


# -- signals: Ctrl-C, and a signal while the model loads ---------------------------------------------

def start_plain(argv, script=ROOT / "launch" / "train.py", env=None):
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    return subprocess.Popen([sys.executable, str(script), *argv], cwd=ROOT, env={**clean, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=180):
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < n:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_75_then_resumes_bitwise(tiny_model, parity_data, tmp_path):
    flags = dict(max_steps=40, lr_schedule="constant")
    ref = tmp_path / "ref"
    launch_ok("python", 1, as_argv(parity_flags(tiny_model, parity_data, ref, **flags)))
    out = tmp_path / "run"
    argv = as_argv(parity_flags(tiny_model, parity_data, out, **flags))
    proc = start_plain(argv)
    try:
        wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "press Ctrl-C again to stop at once" in stderr
    saved = checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None)
    assert saved is not None and 2 <= int(saved.name.split("-")[1]) < 40
    launch_ok("python", 1, argv + ["--resume=auto"])
    assert_same_run(out, ref)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    # Hangs in step 3 like a stuck collective: only the second Ctrl-C can end it.
    proc = start_plain(as_argv(parity_flags(tiny_model, parity_data, out, max_steps=40)),
                       script=WITH_FAULTS, env=faults.env(at="step", action="hang", step=3))
    try:
        wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.5)  # more than StopRequest.INTERRUPT_REPEAT_S: a second Ctrl-C, not the same one seen twice
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Ctrl-C again: stopping now without saving" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_usr1_while_the_model_loads_saves_at_the_first_step(tiny_model, parity_data, tmp_path):
    out = tmp_path / "run"
    proc = start_plain(as_argv(parity_flags(tiny_model, parity_data, out, max_steps=40)), script=WITH_FAULTS,
                       env=faults.env(at="load_model", action="usr1"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None).name == "step-1"


# -- a stopped rank is named ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_rank_is_named_by_the_hang_timeout(tiny_model, parity_data, tmp_path):
    # SIGSTOP inside step 3, after its heartbeat and its optimizer step, before the step's own
    # all-reduce (loss and stop votes): both ranks report step 3, only liveness tells them apart.
    # (Not inside backward: that leaves the others in DeepSpeed's shared-memory all-reduce of the
    # CPU accelerator, which has no timeout at all; NCCL's does.)
    proc = launch_with_fault(dict(at="collective", action="stop", rank=1, step=3), "torchrun", 2,
                             as_argv(parity_flags(tiny_model, parity_data, tmp_path / "run", collective_timeout_s=10)))
    assert proc.returncode != 0
    assert "lagging: rank 1 (last at step 3; no sign of life for" in proc.stderr, proc.stderr[-3000:]
# -- safe loading: a checkpoint file that would run code is refused -----------------------------

class CodeOnLoad:
    """Unpickling this runs code (it writes `marker`): what a crafted checkpoint file carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant_payload(ckpt, pattern: str, marker):
    """Replace one DeepSpeed file of `ckpt` by a payload and reseal the manifest, so that the
    checkpoint still verifies and only the loading itself can refuse it."""
    target = next((ckpt / "ds").glob(pattern))
    torch.save({"module": CodeOnLoad(marker), "optimizer_state_dict": {}}, target)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    with open(target, "rb") as f:  # its size and content hash, as a save would have recorded them
        manifest["files"][str(target.relative_to(ckpt))] = {"size": target.stat().st_size,
                                                            checkpoint.HASH: checkpoint.file_hash(f)}
    checkpoint.write_json(ckpt / checkpoint.MANIFEST, manifest)
    assert checkpoint.verify(ckpt)[0] is not None and checkpoint.verify_content(ckpt, manifest) == ""
    torch.load(target, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.read_text() == "code ran"
    marker.unlink()
    return target


def assert_refused(proc, target, marker):
    assert proc.returncode != 0
    assert f"error: refusing to load {target}: unpickling it needs exec" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("pattern", ["*model_states.pt", "*optim_states.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(pattern, uninterrupted, tiny_model, parity_data,
                                                              tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    marker = tmp_path / "marker"
    target = plant_payload(out / "checkpoints" / "step-8", pattern, marker)
    proc = launch("python", 1, as_argv(ckpt_flags(tiny_model, parity_data, out, resume="auto")))
    assert_refused(proc, target, marker)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_universal_conversion_and_export_refuse_a_checkpoint_file_that_would_run_code(uninterrupted, tiny_model,
                                                                                     parity_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    marker = tmp_path / "marker"
    target = plant_payload(out / "checkpoints" / "step-8", "*optim_states.pt", marker)
    # Written by 1 rank, resumed on 2 (same global batch): DeepSpeed's universal converter reads it.
    proc = launch("torchrun", 2, as_argv(ckpt_flags(tiny_model, parity_data, out, micro_batch_size=2, resume="auto")))
    assert_refused(proc, target, marker)
    assert not (out / "checkpoints" / "step-8" / "ds_universal").exists()

    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(out / "checkpoints" / "step-8"),
                           str(exported)], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS})
    assert_refused(proc, target, marker)
    assert proc.returncode == 2 and not exported.exists()
