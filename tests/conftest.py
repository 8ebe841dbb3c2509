"""Shared fixtures: a tiny model built from a config, generated data, and real launchers.

Nothing is downloaded: the model is the harness's embedded default (a 2-layer Llama-shape
model with a locally trained sentencepiece tokenizer), built into a per-session cache.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LAUNCHER_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # DeepSpeed would pick the CPU accelerator anyway, with a warning per process; on a GPU machine
    # it must pick CUDA, or the cuda-marked tests would train on the CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed's ops are compiled once by scripts/setup.sh into the default extensions folder, which
# the tests use as every run does (a folder of the tests' own would compile them again).


@pytest.fixture(autouse=True)
def no_stale_op_build_lock():
    """Every process that loads a DeepSpeed op holds torch's build lock for a moment, even when the
    op is built (ninja checks it). Tests kill processes at chosen moments, and one killed inside
    that moment leaves the lock behind: every later DeepSpeed start would wait on it forever (the
    hazard harness.engine's watchdog names, tested in test_ops_build.py). Clear such locks between
    tests so one unlucky kill costs nothing more; a lock some process still holds is left alone."""
    from harness import engine

    def clear():
        for lock in engine.extension_build_locks():
            if not engine.lock_holders(lock):
                print(f"conftest: removing stale op build lock {lock}", file=sys.stderr)
                lock.unlink(missing_ok=True)

    clear()
    yield
    clear()


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("harness_cache")
    os.environ["HARNESS_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(harness_cache) -> Path:
    from harness import default_assets

    return default_assets.default_model_dir()


@pytest.fixture(scope="session")
def parity_data(tmp_path_factory) -> Path:
    """Rows of unequal prompt and target lengths, so a mean-of-means loss would differ."""
    from harness import default_assets

    path = tmp_path_factory.mktemp("data") / "parity.jsonl"
    rows = default_assets.generate_sample_instructions(64, seed=7)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as a JSONL file at `path` (returned)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, nproc: int, flags: list[str], timeout: int = 600, script_name: str = "train.py",
           script: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run launch/<script_name> (or `script`) through a real launcher, with `env` added to this
    process's environment."""
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}, **(env or {})}
    script = [str(script or ROOT / "launch" / script_name), *flags]
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *script]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *script]
    elif launcher == "python":
        assert nproc == 1
        cmd = [sys.executable, *script]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def launch_ok(launcher: str, nproc: int, flags: list[str], script_name: str = "train.py",
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = launch(launcher, nproc, flags, script_name=script_name, env=env)
    assert proc.returncode == 0, f"{launcher} x{nproc} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


PARITY_STEPS = 6


def parity_flags(model: Path, data: Path, out: Path, **overrides) -> dict:
    """One fixed fp32 run: only the batch layout, ZeRO stage and launcher vary between tests."""
    flags = dict(model=str(model), data=str(data), output_dir=str(out), max_steps=PARITY_STEPS, lr=1e-3,
                 seed=3, dtype="fp32", micro_batch_size=4, grad_accum_steps=1, ds_config="zero2",
                 packing=False)  # the reference layout is padded; packed runs must equal it
    flags.update(overrides)
    return flags


def as_argv(flags: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="session")
def reference_run(tiny_model, parity_data, tmp_path_factory):
    """1 process, ZeRO-2, micro batch 4, no accumulation: the run every other layout must equal."""
    from harness.config import TrainConfig
    from harness.train import run

    result = run(TrainConfig(**parity_flags(tiny_model, parity_data, tmp_path_factory.mktemp("ref") / "run")))
    weights = {k: v.detach().clone() for k, v in result.engine.module.state_dict().items()}
    return result.losses, weights, result.output_dir
