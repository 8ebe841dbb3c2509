"""The flags: python-fire over TrainConfig, --help, unknown flags, validation."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from conftest import ROOT
from harness.config import TASK_FIELDS, BenchConfig, EvalConfig, PlanConfig, PrepareConfig, TrainConfig, flag_docs
from harness.errors import HarnessError

DERIVED = {EvalConfig: "evaluate.py", PrepareConfig: "prepare_data.py", PlanConfig: "plan.py", BenchConfig: "benchmark.py"}


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_flag_with_its_doc():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr  # fire writes help to stderr when not on a terminal
    for name, doc in flag_docs().items():
        assert f"--{name}=" in text, name
        assert " ".join(doc.split()) in " ".join(text.split()), name


def test_minimum_flags_exist():
    wanted = """model data eval_data task template ds_config output_dir max_steps epochs micro_batch_size
        grad_accum_steps lr warmup_steps warmup_ratio weight_decay lr_schedule max_grad_norm seq_len
        dtype attn grad_ckpt seed log_every""".split()
    assert set(wanted) <= set(flag_docs())


@pytest.mark.parametrize("args, message", [
    (["--bogus_flag", "1"], "unknown flag --bogus_flag"),
    (["stray"], "unexpected argument 'stray'"),
    (["--dtype", "fp8"], "--dtype 'fp8' is not one of"),
    (["--warmup_steps", "5", "--warmup_ratio", "0.1"], "contradict"),
    (["--micro_batch_size", "0"], "--micro_batch_size must be >= 1"),
    (["--lr", "abc"], "--lr expects float"),
])
def test_bad_flags_fail_before_any_work(args, message, tmp_path):
    proc = run_cli(*args, "--output_dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_config_coerces_fire_literals():
    cfg = TrainConfig(model=7, lr=1, grad_ckpt="true", max_steps=3.0)
    assert cfg.model == "7" and isinstance(cfg.lr, float) and cfg.grad_ckpt is True and cfg.max_steps == 3
    with pytest.raises(HarnessError, match="--max_steps expects int"):
        TrainConfig(max_steps=2.5)


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.lr = 1.0


@pytest.mark.parametrize("cls", DERIVED)
def test_other_launchers_share_trainings_flags_and_rules(cls):
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints, train_hints = typing.get_type_hints(cls), typing.get_type_hints(TrainConfig)
    shared = [f.name for f in dataclasses.fields(cls) if f.name in train]
    assert {"micro_batch_size", "seq_len"} & set(shared) or cls is EvalConfig
    assert all(hints[name] is train_hints[name] for name in shared)
    required = {EvalConfig: dict(model="m", data="d"), PrepareConfig: dict(data="d", output="o"),
                PlanConfig: dict(model="m"), BenchConfig: {}}[cls]
    # A value training refuses is refused here too, with training's message.
    with pytest.raises(HarnessError, match="--seq_len must be >= 0, got -1"):
        cls(**required, seq_len=-1)


@pytest.mark.parametrize("cls", [PrepareConfig, EvalConfig, BenchConfig])
def test_launchers_that_read_data_take_every_task_flag(cls):
    assert {"task", "template", *TASK_FIELDS} <= {f.name for f in dataclasses.fields(cls)}


def test_plan_takes_trainings_model_execution_flags():
    assert {"model", "micro_batch_size", "seq_len", "grad_ckpt", "trust_remote_code"} <= set(flag_docs(PlanConfig))


@pytest.mark.parametrize("cls, script", DERIVED.items())
def test_every_launcher_help_lists_its_flags(cls, script):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0 and all(f"--{name}=" in text for name in flag_docs(cls)), proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "warmup_ratio",
                                  "min_lr_ratio", "max_grad_norm", "epochs", "eval_split", "lora_alpha", "lora_dropout"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_every_float_flag_must_be_finite(name, value):
    with pytest.raises(HarnessError, match=f"--{name} must be a finite number"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("cls, name", [(PlanConfig, "gpu_gib"), (BenchConfig, "lr")])
def test_derived_float_flags_must_be_finite(cls, name):
    with pytest.raises(HarnessError, match=f"--{name} must be a finite number"):
        cls(**{"model": "m", name: float("nan")})


@pytest.mark.parametrize("flags, message", [
    (dict(adam_beta1=1.0), "--adam_beta1 must be in"), (dict(adam_beta2=-0.1), "--adam_beta2 must be in"),
    (dict(adam_eps=0.0), "--adam_eps must be > 0"), (dict(lora_alpha=0.0), "--lora_alpha must be > 0"),
])
def test_optimizer_flags_in_range(flags, message):
    with pytest.raises(HarnessError, match=message):
        TrainConfig(**flags)


def test_lr_inf_on_the_command_line_is_a_clear_error(tmp_path):
    proc = run_cli("--lr", "inf", "--output_dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "error: --lr must be a finite number, got inf" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_an_error_never_shares_a_line_with_the_progress_bar(capsys, monkeypatch):
    from tqdm import tqdm

    from harness.cli import command

    def training(cfg):
        bar = tqdm(total=10, desc="train")  # still open when the error surfaces
        bar.update(3)
        raise HarnessError("the disk is full")

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        command(TrainConfig, training, "t")()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").split("\n") if "error:" in line]
    assert lines == ["error: the disk is full"], err
@pytest.mark.parametrize("args", [["--template", "{instruction} -> "], ["--template={instruction} -> "],
                                  ["--labels", "negative,positive"], ["--model", "007"]])
def test_text_flags_arrive_as_typed(args, monkeypatch):
    """python-fire reads values as Python literals ({x} is a set, a,b a tuple, 007 an int); text flags must not."""
    from harness.cli import command

    seen = {}
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    command(TrainConfig, lambda cfg: seen.update(cfg=cfg), "test")(**{"template": {"instruction"}, "labels": ("negative", "positive"), "model": 7})
    name = args[0].lstrip("-").split("=")[0]
    typed = args[0].split("=", 1)[1] if "=" in args[0] else args[1]
    assert getattr(seen["cfg"], name) == typed
