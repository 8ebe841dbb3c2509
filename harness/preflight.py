"""Preflight: check every input and resolve every setting before any weights are loaded.

Everything that can be wrong with a training run's inputs (flags against files, the model
folder, the data rows, the DeepSpeed config, the run directory, a checkpoint to resume from, the
disk room for checkpoints) is found here, on every rank, and raised as a HarnessError naming
the cause. What it resolved comes back as one frozen `TrainSetup`; the training loop reads it
and never changes it.

Two stages. `early_checks` needs no other rank and runs before the process group starts (so
before DeepSpeed compiles anything): the run directory and a resume candidate (by size), the
model folder (config, architecture, every safetensors header, tokenizer), seq_len, precision,
attention kernel, the DeepSpeed config file, task, template, LoRA targets, and that every data
file exists, has a supported type and is not empty. `preflight` then does what needs the process
group or the data's contents: the embedded default model (built by rank 0 first), --ds_config
auto (rank 0 decides), reading and tokenizing the data (local rank 0, cached), the eval set, the
batch arithmetic, the resume checkpoint's content hashes (shared out over the ranks) and its
flags, the disk room for checkpoints, and the data report.

Nothing is written or deleted here, except the tokenization cache (harness.data_cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from harness import (__version__, attention, checkpoint, data, data_cache, default_assets, dist, ds_config, evaluation,
                     memory_plan, model as model_mod, report, rundir, tasks)
from harness.batches import StepBatches
from harness.config import TrainConfig
from harness.ds_config import BatchSizes
from harness.errors import HarnessError
from harness.schedule import warmup_steps
from harness.tasks.common import errors_about, load_template


@dataclass(frozen=True)
class EarlyInputs:
    """What `early_checks` resolved; `preflight` goes on from here."""

    model_path: str  # "" until the embedded default is built (in preflight)
    model_config: object | None
    data_path: str
    eval_data_path: str
    resume_candidate: Path | None  # newest checkpoint whose sizes match its manifest
    raw_ds_config: dict | None  # None for --ds_config auto
    tokenizer: object | None
    lora_params: int


def early_checks(cfg: TrainConfig, device) -> EarlyInputs:
    """Every check that needs no other rank, nothing compiled and nothing written (see the module doc)."""
    out = Path(cfg.output_dir)
    resume_candidate = checkpoint.resolve_resume(cfg.resume, out, warn=lambda _: None)  # preflight warns, after hashing
    rundir.check_output_dir(out, cfg.overwrite, cfg.resume, resume_candidate)
    model_path, data_path, eval_path = cfg.model, cfg.data, cfg.eval_data
    if not data_path:
        data_path = str(default_assets.default_data_path())
        eval_path = eval_path or str(default_assets.default_eval_data_path())
    model_config = tokenizer = None
    lora_params = 0
    if model_path:
        model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
        seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
        if cfg.packing:
            attention.check_model(model_config, seq_len)
        tokenizer = model_mod.load_tokenizer(model_path, cfg.trust_remote_code)
        if cfg.lora:
            lora_params = model_mod.lora_parameters(model_config, cfg.lora_targets, cfg.lora_r, cfg.trust_remote_code)
    dtype = model_mod.resolve_dtype(cfg.dtype, device)
    model_mod.resolve_attention(cfg.attn, device, dtype)
    raw_ds = None if cfg.ds_config == "auto" else ds_config.load(cfg.ds_config)
    tasks.get(cfg.task)
    load_template(cfg.template)
    for path, _ in data.parse_data_spec(data_path):
        data.check_data_path(path, "--data")
    if eval_path:
        data.check_data_path(eval_path, "--eval_data")
    return EarlyInputs(model_path, model_config, data_path, eval_path, resume_candidate, raw_ds, tokenizer, lora_params)


@dataclass(frozen=True)
class TrainSetup:
    """Everything preflight checked and resolved for a training run; its `resolved()` is config.json."""

    cfg: TrainConfig
    model_path: str
    data_path: str
    eval_data_path: str
    seq_len: int
    dtype: str
    attn: str  # the kernel asked for; train.run records the one transformers installed
    attn_kernel: str | None  # the kernel packed rows run on (harness.attention); None when unpacked
    batch: BatchSizes
    ds_config: dict  # every "auto" filled from the flags
    total_steps: int
    sampler: data.StepSampler
    batches: StepBatches  # step -> this rank's micro-batches, padded or packed
    train_rows: data.TokenizedRows  # memory-mapped tokens, index arrays (harness.data)
    tokenizer: object
    eval_set: evaluation.EvalSet | None
    metric_for_best: str  # "eval/<name>", picks best/ and drives early stopping
    greater_is_better: bool
    stats: dict  # tokenization counts over every --data source
    fingerprints: dict  # model and data identity, checked on resume
    resume_from: Path | None
    resume_state: dict | None  # the checkpoint's trainer_state.json
    report: dict  # data_report.json
    # One entry per resume that changed a flag allowed to change (config.MAY_CHANGE_ON_RESUME):
    # {"resumed_from", "step", "changes": {flag: [in the checkpoint, now]}}, the checkpoint's own first.
    changed_on_resume: tuple = ()

    @property
    def evaluates(self) -> bool:
        return self.eval_set is not None and bool(self.eval_set.loss_rows)

    def resolved(self) -> dict:
        return {
            "harness_version": __version__,
            "config": self.cfg.to_dict(),
            "resolved": {
                "model": self.model_path,
                "data": self.data_path,
                "eval_data": self.eval_data_path,
                "seq_len": self.seq_len,
                "dtype": self.dtype,
                "attn_implementation": self.attn,
                "attn_kernel": self.attn_kernel,
                "world_size": self.batch.world_size,
                "global_batch_size": self.batch.global_batch_size,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "warmup_steps": warmup_steps(self.cfg, self.total_steps),
                "data_stats": self.stats,
                "eval_rows": len(self.eval_set.examples) if self.eval_set else 0,
                "metric_for_best": self.metric_for_best,
            },
            "ds_config": self.ds_config,
            "changed_on_resume": list(self.changed_on_resume),
        }


def preflight(cfg: TrainConfig, info: dist.DistInfo, nonce: str | None = None,
              early: EarlyInputs | None = None) -> TrainSetup:
    """Check every input and resolve every setting; raise HarnessError naming what is wrong.

    `nonce` (dist.shared_nonce, the same on every rank) names this job's tokenization error files;
    `early` is what `early_checks` resolved (run now if not given).
    """
    early = early or early_checks(cfg, info.device)
    out = Path(cfg.output_dir)
    # The resume candidate, now also by content (a collective: the files are shared out over the ranks).
    resume_from = checkpoint.resolve_resume(cfg.resume, out, content=True)
    if resume_from != early.resume_candidate:
        rundir.check_output_dir(out, cfg.overwrite, cfg.resume, resume_from)

    # The model, precision, attention kernel and DeepSpeed config.
    model_path, data_path, eval_path = early.model_path, early.data_path, early.eval_data_path
    model_config, tokenizer, lora_params = early.model_config, early.tokenizer, early.lora_params
    if not model_path:
        model_path = str(default_model_dir_on_rank0_first())
        model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
        tokenizer = model_mod.load_tokenizer(model_path, cfg.trust_remote_code)
        if cfg.lora:
            lora_params = model_mod.lora_parameters(model_config, cfg.lora_targets, cfg.lora_r, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
    dtype = model_mod.resolve_dtype(cfg.dtype, info.device)
    attn = model_mod.resolve_attention(cfg.attn, info.device, dtype)
    attn_kernel = None
    if cfg.packing:
        attention.check_model(model_config, seq_len)
        attn_kernel = attention.kernel_for(info.device, model_mod.DTYPES[dtype])
    ds_name = auto_ds_config(model_path, info, cfg, seq_len) if cfg.ds_config == "auto" else cfg.ds_config
    raw_ds = early.raw_ds_config if early.raw_ds_config is not None else ds_config.load(ds_name)

    # The data: every source tokenized (or read from the cache), mixed, and the eval set.
    task = tasks.get(cfg.task)
    tasks.setup_tokenizer(task, cfg, tokenizer)
    template = load_template(cfg.template)
    nonce = nonce or dist.shared_nonce()

    def load(i: int, path: str, what: str) -> tuple[data.TokenizedRows, data.TokenizeStats, bool]:
        with errors_about(f"{what} {path}"):
            tokenized, hit = data_cache.tokenized(path, model_path, cfg, task, template, tokenizer, seq_len,
                                                  cfg.num_proc, info.local_rank, nonce, what)
        rows, stats = data.rows_from_dataset(tokenized, tokenizer.eos_token_id, source=i,
                                             digest=data_cache.recorded_digest(tokenized))
        data.check_supervised(stats, f"{what} {path}")
        return rows, stats, hit

    sources = data.parse_data_spec(data_path)
    loaded = [load(i, path, "--data") for i, (path, _) in enumerate(sources)]
    train_parts = [rows for rows, _, _ in loaded]
    held_out = [0] * len(sources)
    eval_examples = []
    if eval_path:
        with errors_about(f"--eval_data {eval_path}"):
            eval_examples = task.examples(data.read_rows(eval_path, "--eval_data"), cfg, template)
    elif cfg.eval_split:
        # Per source, before mixing: an up-sampled source repeats rows, and a row held out must
        # not come back into training as its own copy.
        splits = [data.split_rows(rows, cfg.eval_split, cfg.seed, i, f"--data {path}")
                  for i, (rows, (path, _)) in enumerate(zip(train_parts, sources))]
        train_parts = [train for train, _ in splits]
        held = data.TokenizedRows.concat([h for _, h in splits])
        held_out = [len(h) for _, h in splits]
        eval_examples = evaluation.examples_of([held.origin(i) for i in range(len(held))],
                                               [path for path, _ in sources], task, cfg, template)
    train_rows, in_mix = data.mix(train_parts, [w for _, w in sources], cfg.seed)
    eval_set = evaluation.prepare(task, eval_examples, cfg, tokenizer, seq_len) if eval_examples else None
    metric, greater_is_better = evaluation.metric_for_best(task, cfg, eval_set is not None)

    # Steps: the batch arithmetic, which rows each step holds, how long the run is.
    batch = BatchSizes(cfg.micro_batch_size, cfg.grad_accum_steps, info.world_size)
    sampler = data.StepSampler(len(train_rows), batch.micro_batch_size, batch.grad_accum_steps,
                               batch.world_size, cfg.seed, lengths=train_rows.lengths,
                               group_by_length=cfg.group_by_length)
    batches = StepBatches(train_rows, sampler, data.pad_id(tokenizer), cfg.packing, seq_len)
    total = data.total_steps(cfg.max_steps, cfg.epochs, sampler.steps_per_epoch)
    filled = ds_config.fill(raw_ds, cfg, batch, dtype, on_cpu=info.device.type == "cpu",
                            source=str(ds_config.resolve_path(ds_name)))
    if cfg.save_steps:
        n_params = model_mod.count_parameters(model_path)
        trained, frozen = (lora_params, n_params) if cfg.lora else (n_params, 0)
        rundir.check_checkpoint_room(out, cfg, total, trained, frozen, dtype)

    # Resume: the checkpoint must belong to this very run (model, data, batch layout, ZeRO stage).
    fingerprints = {"model_fingerprint": model_fingerprint(model_config),
                    "data_fingerprint": data.fingerprint(train_rows),
                    # How samples are grouped into steps and laid out in rows: a resume under
                    # other settings would see other batches.
                    "batch_layout": f"packing={cfg.packing} group_by_length={cfg.group_by_length} seq_len={seq_len}"}
    resume_state = None
    if resume_from is not None and checkpoint.written_world_size(resume_from) != info.world_size:
        # Another world size: resume through DeepSpeed's universal checkpoint (see checkpoint.restore).
        filled.setdefault("checkpoint", {})["load_universal"] = True
    if resume_from is not None:
        resume_state = checkpoint.check_compatible(resume_from, {
            **fingerprints, "zero_stage": ds_config.zero_stage(filled), "world_size": info.world_size,
            "global_batch_size": batch.global_batch_size, "seed": cfg.seed})

    data_report = report.build([report.SourceReport(path, weight, stats, n, hit, held)
                                for (path, weight), (_, stats, hit), n, held in zip(sources, loaded, in_mix, held_out)],
                               tokenizer, batches, min(total, sampler.steps_per_epoch), seq_len)
    stats = [s for _, s, _ in loaded]
    setup = TrainSetup(
        cfg=cfg, model_path=model_path, data_path=data_path, eval_data_path=eval_path, seq_len=seq_len, dtype=dtype,
        attn=attn, attn_kernel=attn_kernel, batch=batch, ds_config=filled, total_steps=total, sampler=sampler, batches=batches,
        train_rows=train_rows, tokenizer=tokenizer, eval_set=eval_set, metric_for_best=metric,
        greater_is_better=greater_is_better,
        stats={"rows": sum(s.rows for s in stats), "prompt_truncated": sum(s.prompt_truncated for s in stats),
               "target_truncated": sum(s.target_truncated for s in stats),
               "zero_supervised_dropped": [r for s in stats for r in s.zero_supervised]},
        fingerprints=fingerprints, resume_from=resume_from, resume_state=resume_state, report=data_report)
    if resume_state is not None:
        # Every flag that changes the run must equal the checkpoint's; the ones that may change are recorded.
        recorded = resume_state.get("config", {})
        changes = checkpoint.resume_changes(resume_from, recorded, setup.resolved())
        changes = {k: v for k, v in changes.items() if k not in ("resume", "overwrite", "local_rank")}
        history = list(recorded.get("changed_on_resume", []))
        if changes:
            history.append({"resumed_from": str(resume_from), "step": resume_state["step"], "changes": changes})
            dist.print0("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        setup = dataclasses.replace(setup, changed_on_resume=tuple(history))
    dist.print0(report.summary(data_report))
    return setup


def auto_ds_config(model_path: str, info: dist.DistInfo, cfg: TrainConfig, seq_len: int) -> str:
    """`--ds_config auto`: the memory planner's recommendation (harness.memory_plan) on this machine.

    Every rank must use the same ZeRO config, and hosts may differ in memory: rank 0 decides.
    """
    try:
        choice, text = memory_plan.auto_ds_config(model_path, info.world_size, info.device, cfg.micro_batch_size,
                                                  seq_len, cfg.grad_ckpt, cfg.trust_remote_code)
    except HarnessError as err:
        choice, text = None, str(err)
    choice, text = dist.all_gather_objects((choice, text))[0]
    if choice is None:
        raise HarnessError(text)
    dist.print0(f"--ds_config auto -> {choice}\n{text}")
    return choice


def model_fingerprint(model_config) -> str:
    """Identity of the architecture and shape, not of the folder it was read from."""
    cfg = {k: v for k, v in model_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_model_dir_on_rank0_first() -> Path:
    # The build is race-safe, but letting rank 0 build first spares the other ranks the work.
    if dist.info().is_rank0:
        path = default_assets.default_model_dir()
        dist.barrier()
    else:
        dist.barrier()
        path = default_assets.default_model_dir()
    return path
