"""Every bad input stops with a clear error before any weights load, and touches no output."""

import json
import os
import shutil
import subprocess
from pathlib import Path

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


# -- the model folder: decoder-only, every weight accounted for, readable shards ----------------

def copy_model(tiny_model, tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


def test_an_encoder_that_transformers_wraps_as_a_causal_lm_is_refused(good, tiny_model, tmp_path):
    # BertLMHeadModel exists, so model_type bert passes "has a causal-LM class"; its folder is a masked LM.
    from transformers import AutoConfig, BertConfig, BertForMaskedLM

    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(folder)
    for f in tiny_model.iterdir():
        if "token" in f.name:
            shutil.copy(f, folder)
    check("model_type 'bert' is an encoder .*BertForMaskedLM.*decoder-only causal LMs", **{**good, "model": str(folder)})


def test_an_encoder_decoder_is_refused(good, tmp_path):
    folder = tmp_path / "bart"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bart", "is_encoder_decoder": True}))
    check("encoder-decoder", **{**good, "model": str(folder)})


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"),
     r"1 weight\(s\) missing from the folder .*: model.layers.1.mlp.down_proj.weight"),
    (lambda sd: sd.update({"model.extra_head.weight": torch.zeros(2)}),
     r"1 weight\(s\) in the folder but not in the model: model.extra_head.weight"),
])
def test_a_folder_whose_weights_do_not_match_the_model_is_refused_naming_them(edit, message, good, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tiny_model, tmp_path)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    check(message, **{**good, "model": str(folder)})


def test_a_truncated_safetensors_file_is_named_before_any_load(good, tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path)
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    check("model.safetensors is damaged or truncated", **{**good, "model": str(folder)})


def test_an_index_naming_a_missing_shard(good, tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    check("names shards that are not in the folder: model-00002-of-00002.safetensors", **{**good, "model": str(folder)})


# -- data and eval data: errors name the flag and the file --------------------------------------

def test_an_eval_data_label_error_says_it_is_eval_data(good, tmp_path):
    rows = [{"text": f"t {i}", "label": ["neg", "pos"][i % 2]} for i in range(8)]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[3]["label"] = "maybe"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check(f"^--eval_data {dev}: bad rows in the data:\n  row 3: label not in --labels",
          **{**good, "task": "classification", "labels": "neg,pos", "data": str(train), "eval_data": str(dev)})


# -- the run directory -------------------------------------------------------------------------

def test_overwrite_names_what_it_deletes_that_the_harness_did_not_write(good, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"harness_version": "0.1.0"}))
    (out / "metrics.jsonl").write_text("")
    (out / "my_notes.txt").write_text("keep?")
    (out / "plots").mkdir()
    preflight(TrainConfig(**good, overwrite=True), CPU1)
    err = capsys.readouterr().out
    assert "--overwrite deletes 2 entries" in err and "my_notes.txt" in err and "plots/" in err
    assert "metrics.jsonl" not in err.split("did not write:")[1]


def test_disk_room_message_uses_readable_units(tiny_model, parity_data, tmp_path, monkeypatch):
    from harness import rundir

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    flags = dict(model=str(tiny_model), data=str(parity_data), output_dir=str(tmp_path / "run"), save_steps=2)
    check(r"needs about [0-9.]+ MiB for \d+ checkpoints .* has 976.6 KiB free", **flags)
    assert rundir.readable_bytes(5 * 2**40) == "5.0 TiB" and rundir.readable_bytes(12) == "12 bytes"


@pytest.mark.parametrize("where", ["read-only mount", "system folder"])
def test_an_output_location_that_cannot_be_written_is_a_clear_error(where, good, tmp_path):
    from harness.train import run

    if where == "read-only mount":
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], capture_output=True).returncode:
            ro.chmod(0o555)  # not allowed to mount (not root): a folder without write permission
            if os.access(ro, os.W_OK):
                pytest.skip("neither a read-only mount nor a read-only folder can be made here")
        out = ro / "run"
    else:
        out = Path("/sys/harness-run")  # no process may create folders there
    try:
        with pytest.raises(HarnessError, match=f"--output_dir {out}: (cannot write there|.* is not writable)"):
            run(TrainConfig(**{**good, "output_dir": str(out)}))
    finally:
        if where == "read-only mount":
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)


# -- order: every check that needs no other rank before the process group starts --------------

@pytest.mark.parametrize("bad", [
    dict(data="/nonexistent/train.jsonl"), dict(model="/nonexistent/model"), dict(eval_data="/nonexistent/dev.jsonl"),
    dict(ds_config="/nonexistent/ds.json"), dict(seq_len=100000),
])
def test_inputs_are_checked_before_anything_is_compiled(bad, good, monkeypatch):
    # init_distributed starts the process group, where DeepSpeed JIT-compiles its CPU comm op
    # on first use (about a minute): a missing file must be named before it.
    from harness import train

    def compile_first(*args, **kwargs):
        raise AssertionError("init_distributed ran before the input checks")

    monkeypatch.setattr(train, "init_distributed", compile_first)
    with pytest.raises(HarnessError):
        train.run(TrainConfig(**{**good, **bad}))
