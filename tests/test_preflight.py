"""Every bad input stops with a clear error before any weights load, and touches no output."""

import json
import shutil

import pytest
import torch

from harness import dist
from harness.config import TrainConfig
from harness.dist import DistInfo
from harness.errors import HarnessError
from harness.preflight import preflight

CPU1 = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture
def good(tiny_model, parity_data, tmp_path):
    return dict(model=str(tiny_model), data=str(parity_data), output_dir=str(tmp_path / "run"), micro_batch_size=2)


def check(message, **flags):
    with pytest.raises(HarnessError, match=message):
        preflight(TrainConfig(**flags), CPU1)


def test_good_inputs_resolve(good):
    setup = preflight(TrainConfig(**good), CPU1)
    assert setup.seq_len == 512 and setup.dtype == "fp32" and setup.attn == "sdpa"
    assert setup.sampler.steps_per_epoch == 32 and setup.total_steps == 32 and len(setup.train_rows) == 64
    assert setup.ds_config["train_batch_size"] == 2


def test_missing_data_file(good, tmp_path):
    check("--data .*missing.jsonl: no such file", **{**good, "data": str(tmp_path / "missing.jsonl")})


def test_wrong_field(good, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "output": "b"}) + "\n")
    check("no field 'instruction'", **{**good, "data": str(path)})


def test_empty_dataset(good, tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[]")
    check("empty", **{**good, "data": str(path)})


def test_model_folder_missing(good, tmp_path):
    check("--model .*: no such folder", **{**good, "model": str(tmp_path / "nope")})


def test_model_folder_not_a_causal_lm(good, tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    check("model_type 't5' is not a causal", **{**good, "model": str(folder)})


def test_model_folder_without_safetensors(good, tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").unlink()
    check("no \\*.safetensors", **{**good, "model": str(folder)})


def test_ds_config_missing_invalid_or_contradicting(good, tmp_path):
    check("no such file", **{**good, "ds_config": str(tmp_path / "x.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    check("invalid JSON", **{**good, "ds_config": str(bad)})
    contra = tmp_path / "contra.json"
    contra.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW"}}))
    check("train_micro_batch_size_per_gpu=16 but --micro_batch_size gives 2", **{**good, "ds_config": str(contra)})


def test_seq_len_above_model_maximum(good):
    check("--seq_len 4096 exceeds the model's maximum of 512", **{**good, "seq_len": 4096})


def test_fp16_on_cpu(good):
    check("--dtype fp16 needs a GPU", **{**good, "dtype": "fp16"})


def test_flash_attention_without_the_package(good):
    check("--attn flash_attention_2: ", **{**good, "attn": "flash_attention_2"})


def test_unknown_task(good):
    check("--task 'poetry' is not one of", **{**good, "task": "poetry"})


def test_too_few_rows(good, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    check("1 usable rows, fewer than one global batch of 2", **{**good, "data": str(path)})


def test_non_empty_output_dir_is_refused_and_untouched(good, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    check("not written by this harness.*refusing to use it", **good)
    check("not written by this harness.*refusing to delete it", **{**good, "overwrite": True})
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_accepts_a_previous_run_dir(good, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"harness_version": "0.1.0"}))
    check("is not empty", **good)
    preflight(TrainConfig(**good, overwrite=True), CPU1)
    assert (out / "config.json").exists()  # preflight itself never deletes anything


def test_a_check_that_fails_raises_the_same_error_on_every_rank():
    def check(value):
        if value < 0:
            raise HarnessError(f"--value {value} must be >= 0")
        return value * 2

    assert dist.checked_on_every_rank(check, 3) == 6
    with pytest.raises(HarnessError, match="--value -1 must be >= 0"):
        dist.checked_on_every_rank(check, -1)
