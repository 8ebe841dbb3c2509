"""Fine-tune a causal LM: preflight every input, then one training loop.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model M --data D --output_dir R
    torchrun --nproc_per_node 8 launch/train.py ...     # same flags
    python launch/train.py                               # one process, embedded default

Reading order: `run` -> `preflight` (everything that can be wrong with the inputs, checked on
every rank before any weights are loaded) -> `train_loop`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import (__version__, checkpoint, data, data_cache, dist, ds_config, engine as engine_mod,
                     evaluation, export, model as model_mod, report, tasks)
from harness.config import TrainConfig
from harness.errors import CollectiveTimeout, HarnessError, TrainingAborted
from harness.loss import supervised_tokens
from harness.metrics import MetricsLogger
from harness.schedule import lr_lambda, warmup_steps
from harness.throughput import StepTimer, StepTokens, Window, count_tokens, flop_model, peak_flops, peak_memory
from harness.tasks.common import load_template


@dataclass
class Plan:
    """Everything preflight resolved; written to config.json."""

    cfg: TrainConfig
    model_path: str
    data_path: str
    eval_data_path: str
    seq_len: int
    dtype: str
    attn: str
    batch: ds_config.BatchPlan
    ds_config: dict
    total_steps: int
    sampler: data.StepSampler
    train_rows: list[data.TokenizedRow]
    eval_rows: list[data.TokenizedRow]
    tokenizer: object
    stats: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)  # model and data identity, checked on resume
    resume_from: Path | None = None
    resume_state: dict | None = None
    batches: data.StepBatches | None = None  # step -> this rank's micro-batches, padded or packed
    report: dict = field(default_factory=dict)  # data_report.json
    eval_set: evaluation.EvalSet | None = None
    best: evaluation.BestTracker | None = None

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
                "world_size": self.batch.world_size,
                "global_batch_size": self.batch.global_batch_size,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "warmup_steps": warmup_steps(self.cfg, self.total_steps),
                "data_stats": self.stats,
                "eval_rows": len(self.eval_set.examples) if self.eval_set else 0,
                "metric_for_best": self.best.metric if self.best else None,
            },
            "ds_config": self.ds_config,
        }


@dataclass
class RunResult:
    output_dir: Path
    losses: list[float]
    engine: engine_mod.Engine
    plan: Plan


def run(cfg: TrainConfig) -> RunResult:
    info = engine_mod.init_distributed(cfg.collective_timeout_s)
    plan, error = None, None
    nonce = dist.shared_nonce()  # before any check can fail, so every rank reaches this collective
    try:
        plan = preflight(cfg, info, nonce)
    except HarnessError as err:
        error = str(err)
    error = dist.agree(error)
    if error:
        raise HarnessError(error)
    try:
        return train_loop(plan, info)
    except RuntimeError as err:
        if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
            raise
        raise CollectiveTimeout(describe_hang(info, cfg.collective_timeout_s, err)) from err


def describe_hang(info: dist.DistInfo, timeout_s: int, err: Exception) -> str:
    beats = dist.last_heartbeats()
    mine = beats.get(info.rank)
    laggards = {r: s for r, s in beats.items() if r != info.rank and (s is None or mine is None or s < mine)}
    who = ", ".join(f"rank {r} (last at step {s})" for r, s in sorted(laggards.items())) or "unknown (no rank is behind)"
    return (f"rank {info.rank} waited more than --collective_timeout_s {timeout_s} in a collective at step {mine}; "
            f"lagging: {who}. First error: {str(err).splitlines()[0]}")


def preflight(cfg: TrainConfig, info: dist.DistInfo, nonce: str | None = None) -> Plan:
    """Check every input and resolve every setting; raise HarnessError naming what is wrong."""
    out = Path(cfg.output_dir)
    resume_from = checkpoint.resolve_resume(cfg.resume, out)
    check_output_dir(out, cfg.overwrite, cfg.resume, resume_from)

    model_path, data_path, eval_path = cfg.model, cfg.data, cfg.eval_data
    if not model_path or not data_path:
        from harness import default_assets

        if not model_path:
            model_path = str(default_model_dir_on_rank0_first(default_assets))
        if not data_path:
            data_path = str(default_assets.default_data_path())
            eval_path = eval_path or str(default_assets.default_eval_data_path())

    model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
    dtype = model_mod.resolve_dtype(cfg.dtype, info.device)
    attn = model_mod.resolve_attention(cfg.attn, info.device, dtype)
    tokenizer = model_mod.load_tokenizer(model_path, cfg.trust_remote_code)
    ds_name = auto_ds_config(model_path, info, cfg, seq_len) if cfg.ds_config == "auto" else cfg.ds_config
    raw_ds = ds_config.load(ds_name)

    if cfg.lora:
        model_mod.check_lora_targets(model_config, cfg.lora_targets, cfg.trust_remote_code)

    task = tasks.get(cfg.task)
    template = load_template(cfg.template)
    nonce = nonce or dist.shared_nonce()

    def load(path: str, what: str) -> tuple[list[data.TokenizedRow], data.TokenizeStats, bool]:
        tokenized, hit = data_cache.tokenized(path, model_path, cfg, task, template, tokenizer, seq_len,
                                              cfg.num_proc, info.local_rank, nonce, what)
        rows, stats = data.rows_from_dataset(tokenized, tokenizer.eos_token_id)
        data.check_supervised(stats, f"{what} {path}")
        return rows, stats, hit

    sources = data.parse_data_spec(data_path)
    loaded = [load(path, "--data") for path, _ in sources]
    for i, (rows, _, _) in enumerate(loaded):
        for r in rows:
            r.source = i
    train_rows, in_mix = data.mix([rows for rows, _, _ in loaded], [w for _, w in sources], cfg.seed)
    eval_examples = []
    if eval_path:
        eval_examples = task.examples(data.read_rows(eval_path, "--eval_data"), cfg, template)
    elif cfg.eval_split:
        train_rows, held = evaluation.split(train_rows, cfg.eval_split, cfg.seed)
        eval_examples = examples_of(held, [path for path, _ in sources], task, cfg, template)
    eval_set = evaluation.prepare(task, eval_examples, cfg, tokenizer, seq_len) if eval_examples else None
    eval_rows = eval_set.loss_rows if eval_set else []
    best = evaluation.BestTracker(*evaluation.metric_for_best(task, cfg, eval_set is not None),
                                  cfg.early_stopping_patience)

    batch = ds_config.BatchPlan(cfg.micro_batch_size, cfg.grad_accum_steps, info.world_size)
    sampler = data.StepSampler(len(train_rows), batch.micro_batch_size, batch.grad_accum_steps,
                               batch.world_size, cfg.seed, lengths=[len(r.input_ids) for r in train_rows],
                               group_by_length=cfg.group_by_length)
    batches = data.StepBatches(train_rows, sampler, data.pad_id(tokenizer), cfg.packing, seq_len)
    total = data.total_steps(cfg.max_steps, cfg.epochs, sampler.steps_per_epoch)
    filled = ds_config.fill(raw_ds, cfg, batch, dtype, on_cpu=info.device.type == "cpu",
                            source=str(ds_config.resolve_path(ds_name)))
    if cfg.save_steps:
        check_checkpoint_room(out, model_mod.count_parameters(model_path), cfg, total)
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
    data_report = report.build([report.SourceReport(path, weight, stats, n, hit)
                                for (path, weight), (_, stats, hit), n in zip(sources, loaded, in_mix)],
                               tokenizer, batches, min(total, sampler.steps_per_epoch), seq_len)
    dist.print0(report.summary(data_report))
    stats = [s for _, s, _ in loaded]
    return Plan(cfg, model_path, data_path, eval_path, seq_len, dtype, attn, batch, filled, total,
                sampler, train_rows, eval_rows, tokenizer,
                stats={"rows": sum(s.rows for s in stats), "prompt_truncated": sum(s.prompt_truncated for s in stats),
                       "target_truncated": sum(s.target_truncated for s in stats),
                       "zero_supervised_dropped": [r for s in stats for r in s.zero_supervised]},
                fingerprints=fingerprints, resume_from=resume_from, resume_state=resume_state,
                batches=batches, report=data_report, eval_set=eval_set, best=best)


def auto_ds_config(model_path: str, info: dist.DistInfo, cfg: TrainConfig, seq_len: int) -> str:
    """`--ds_config auto`: the memory planner's recommendation (harness.memory_plan) on this machine.

    Every rank must use the same ZeRO config, and hosts may differ in memory: rank 0 decides.
    """
    from harness import memory_plan

    try:
        choice, text = memory_plan.auto_ds_config(model_path, info.world_size, info.device, cfg.micro_batch_size,
                                                  seq_len, cfg.grad_ckpt)
    except HarnessError as err:
        choice, text = None, str(err)
    choice, text = dist.all_gather_objects((choice, text))[0]
    if choice is None:
        raise HarnessError(text)
    dist.print0(f"--ds_config auto -> {choice}\n{text}")
    return choice


# A checkpoint holds per parameter: fp32 master weights and two fp32 Adam moments (12 bytes),
# plus the module weights (up to 4 bytes); RNG, config and tokenizer are small by comparison.
CHECKPOINT_BYTES_PER_PARAM = 16


def check_checkpoint_room(out: Path, n_params: int, cfg: TrainConfig, total_steps: int) -> None:
    """Refuse to start a run whose checkpoints cannot fit, instead of failing hours in."""
    saves = -(-total_steps // cfg.save_steps)
    kept = min(saves, cfg.keep_last + 1 if cfg.keep_last else saves)  # +1: the new one before pruning
    need = kept * n_params * CHECKPOINT_BYTES_PER_PARAM
    existing = next(p for p in [out, *out.resolve().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise HarnessError(f"--save_steps {cfg.save_steps} with --keep_last {cfg.keep_last} needs about "
                           f"{need / 2**30:.1f} GiB for {kept} checkpoints of a {n_params / 1e9:.2f}B-parameter model, "
                           f"but {existing} has {free / 2**30:.1f} GiB free; lower --keep_last or free space")


def model_fingerprint(model_config) -> str:
    """Identity of the architecture and shape, not of the folder it was read from."""
    cfg = {k: v for k, v in model_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def examples_of(rows: list[data.TokenizedRow], paths: list[str], task, cfg: TrainConfig, template: str):
    """The task examples (prompts and references, for metrics) behind some tokenized rows."""
    wanted = {(r.source, r.row) for r in rows}
    found = []
    for source, path in enumerate(paths):
        if any(s == source for s, _ in wanted):
            found += [e for e in task.examples(data.read_rows(path), cfg, template) if (source, e.row) in wanted]
    return found


def default_model_dir_on_rank0_first(default_assets) -> Path:
    # The build is race-safe, but letting rank 0 build first spares the other ranks the work.
    if dist.info().is_rank0:
        path = default_assets.default_model_dir()
        dist.barrier()
    else:
        dist.barrier()
        path = default_assets.default_model_dir()
    return path


def check_output_dir(out: Path, overwrite: bool, resume: str = "", resume_from: Path | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--output_dir {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_run_dir(out):
        raise HarnessError(f"--output_dir {out} is not empty and was not written by this harness "
                           f"(no config.json with harness_version); refusing to {'delete' if overwrite else 'use'} it")
    if resume_from is not None and continues_in_place(out, resume_from):
        return
    if resume == "auto" and not (out / "final").exists():
        return  # an earlier attempt died before its first checkpoint: nothing to keep, start again
    if not overwrite:
        raise HarnessError(f"--output_dir {out} is not empty; choose another folder, pass --overwrite, "
                           f"or --resume auto to continue from its newest checkpoint")


def continues_in_place(out: Path, resume_from: Path | None) -> bool:
    return resume_from is not None and out.resolve() in resume_from.resolve().parents


def is_run_dir(out: Path) -> bool:
    try:
        return "harness_version" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False


def prepare_output_dir(plan: Plan, info: dist.DistInfo) -> Path:
    out = Path(plan.cfg.output_dir)
    if info.is_rank0:
        if continues_in_place(out, plan.resume_from):
            drop_metrics_after(out / "metrics.jsonl", plan.resume_state["step"])
        elif out.exists() and any(out.iterdir()):
            shutil.rmtree(out)  # preflight proved it is our own run directory and it may be replaced
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def drop_metrics_after(path: Path, step: int) -> None:
    """Steps logged after the checkpoint we resume from will be run (and logged) again."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        checkpoint.replace_atomically(path, "".join(line + "\n" for line in kept))


def write_config(plan: Plan, out: Path, info: dist.DistInfo) -> None:
    if info.is_rank0:
        (out / "config.json").write_text(json.dumps(plan.resolved(), indent=2) + "\n")
        (out / "data_report.json").write_text(json.dumps(plan.report, indent=2) + "\n")


def train_loop(plan: Plan, info: dist.DistInfo) -> RunResult:
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    out = prepare_output_dir(plan, info)

    load_ctx = engine_mod.Zero3LoadContext(plan.ds_config)
    model = model_mod.load_model(plan.model_path, plan.dtype, plan.attn, cfg.grad_ckpt, cfg.trust_remote_code)
    if cfg.lora:
        model = model_mod.apply_lora(model, cfg)
    engine = engine_mod.Engine(model, plan.ds_config, lr_lambda(cfg, plan.total_steps), cfg.chunked_ce)
    load_ctx.release()
    # Record the kernel transformers actually installed, not the one we asked for.
    plan.attn = getattr(engine.module.config, "_attn_implementation", None) or plan.attn
    write_config(plan, out, info)

    start_step, tokens_seen, bad_steps = 0, 0, 0
    last_saved = None
    if plan.resume_from is not None:
        checkpoint.restore(engine, plan.resume_from, info)
        state = plan.resume_state
        start_step, tokens_seen, bad_steps = state["step"], state["tokens_seen"], state["bad_steps"]
        if state["best"]["metric"] == plan.best.metric:  # best/ and early stopping carry on where they were
            best = state["best"]
            plan.best.best, plan.best.best_step, plan.best.evals_without_gain = (
                best["value"], best["step"], best["evals_without_gain"])
        last_saved = plan.resume_from
        dist.print0(f"resumed from {plan.resume_from} at step {start_step}")
    dist.print0(f"model {plan.model_path}: attention={plan.attn} dtype={plan.dtype} zero_stage={engine.zero_stage} "
                f"world_size={info.world_size} global_batch={plan.batch.global_batch_size} steps={plan.total_steps}")

    sampler = plan.sampler
    pad_id = data.pad_id(plan.tokenizer)
    logger = MetricsLogger(out, info.is_rank0, plan.total_steps, start_step)
    stop = checkpoint.StopRequest()
    losses: list[float] = []
    flops = flop_model(engine.module)
    peak, device_name = peak_flops(info.device, plan.dtype)
    dist.print0(f"throughput: {flops.linear_flops_per_token / 1e6:.3f} MFLOP per token in matmuls; "
                + (f"MFU against {peak / 1e12:.1f} TFLOP/s per device ({device_name}, {plan.dtype})" if peak else device_name))
    window = Window(info.world_size, peak)
    timer = StepTimer(info.device)

    def save(step: int) -> Path:
        state = {"step": step, "epoch": step // sampler.steps_per_epoch,
                 "rows_into_epoch": (step % sampler.steps_per_epoch) * sampler.global_batch,
                 "micro_step": step * cfg.grad_accum_steps, "tokens_seen": tokens_seen, "bad_steps": bad_steps,
                 "global_batch_size": plan.batch.global_batch_size, "seed": cfg.seed,
                 "best": {"metric": plan.best.metric, "value": plan.best.best, "step": plan.best.best_step,
                          "evals_without_gain": plan.best.evals_without_gain},
                 **plan.fingerprints, "config": plan.resolved()}
        t = timer.start("checkpoint")
        folder = checkpoint.save(engine, out, step, state, lambda folder: save_hf_files(engine, plan, folder),
                                 info, cfg.keep_last)
        timer.stop(t)
        return folder

    if plan.eval_rows and start_step == 0:
        log_eval(engine, plan, info, pad_id, logger, 0)  # the baseline every later eval is read against
    engine.train()
    window.reset()  # training throughput: the step-0 evaluation is not training time
    done_steps = start_step
    for step in range(start_step, plan.total_steps):
        done_steps = step + 1
        checkpoint.fault_point("step", step + 1)  # test hook: crash or hang here (HARNESS_CRASH_AT/HANG_AT)
        dist.heartbeat(step + 1)
        step_start = time.perf_counter()
        lr = engine.lr()  # the rate this step's update uses; the scheduler advances inside the step
        t = timer.start("data")
        micro_batches = plan.batches(step, info.rank)  # padded or packed, the same samples either way
        local = count_tokens(micro_batches, flops, supervised_tokens)
        # Every rank needs the step's supervised count before its first backward (loss scaling),
        # so waiting for it is part of getting the data.
        step_supervised, step_real, step_slots, step_flops = dist.all_reduce_sum(
            [local.supervised, local.real, local.slots, local.flops])
        timer.stop(t)

        skipped_before = engine.skipped_steps()
        local_loss_sum = sum(engine.micro_step(b, step_supervised, step, timer) for b in micro_batches)
        # One collective for the loss and for "has any rank been asked to stop"; it is also the
        # step's sync point for timing.
        loss_sum, stop_votes = dist.all_reduce_sum([local_loss_sum, float(stop.requested)])
        loss = loss_sum / step_supervised
        losses.append(loss)
        tokens_seen += int(step_real)
        step_time = time.perf_counter() - step_start
        window.add(StepTokens(int(step_slots), int(step_real), int(step_supervised), step_flops))

        if engine.skipped_steps() > skipped_before or not math.isfinite(loss):
            bad_steps += 1
            rows = [plan.train_rows[i].row for r in range(info.world_size) for m in sampler.step(step, r) for i in m]
            logger.log(step + 1, {"skipped_step": 1, "bad_steps": bad_steps, "loss": loss, "sample_rows": rows})
            logger.write(f"step {step + 1}: non-finite loss or gradient norm; update skipped "
                         f"({bad_steps} in a row); data rows {rows}")
            if bad_steps >= cfg.max_bad_steps:
                last_good = checkpoint.newest_verified(out / "checkpoints", warn=lambda _: None)
                raise TrainingAborted(f"{bad_steps} consecutive optimizer steps had a non-finite loss or gradient "
                                      f"norm (last at step {step + 1}); aborting. Last good checkpoint: "
                                      f"{last_good or 'none'}")
        else:
            bad_steps = 0

        if (step + 1) % cfg.log_every == 0 or step + 1 == plan.total_steps:
            # Rates, MFU and the phase breakdown cover every step since the last log line,
            # checkpoint saves included, evaluation excluded.
            rates = window.record()
            logger.log(step + 1, {
                "loss": loss, "lr": lr, "grad_norm": engine.last_grad_norm(),
                "tokens": tokens_seen, "supervised_tokens": int(step_supervised),
                **rates, "step_time_s": step_time, **timer.take(), **peak_memory(info.device),
                "epoch": (step + 1) / sampler.steps_per_epoch,
            })
            logger.progress(window.steps, loss, rates)
            window.reset()

        if plan.eval_rows and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < plan.total_steps:
            eval_start = time.perf_counter()
            stop_early = log_eval(engine, plan, info, pad_id, logger, step + 1)
            window.exclude(time.perf_counter() - eval_start)  # evaluation is not training throughput
            if stop_early:
                dist.print0(f"early stopping at step {step + 1}: {plan.best.metric} has not improved on "
                            f"{plan.best.best:.4f} (step {plan.best.best_step}) for {cfg.early_stopping_patience} evaluations")
                break
            engine.train()

        if cfg.save_steps and ((step + 1) % cfg.save_steps == 0 or step + 1 == plan.total_steps):
            last_saved = save(step + 1)
        if stop_votes > 0:
            if last_saved is None or last_saved.name != f"step-{step + 1}":
                last_saved = save(step + 1)
            checkpoint.mark_requeue(out, last_saved, info)
            logger.write(f"stop requested by signal: saved {last_saved}; exiting with {checkpoint.EXIT_REQUEUE} "
                         f"(resume with --resume auto)")
            logger.close()
            stop.close()
            dist.destroy()
            sys.exit(checkpoint.EXIT_REQUEUE)

    if plan.eval_rows and not plan.best.should_stop:
        log_eval(engine, plan, info, pad_id, logger, done_steps)
    save_final(engine, plan, out, info)
    logger.close()
    stop.close()
    if losses:
        dist.print0(f"done: {done_steps} steps, final loss {losses[-1]:.4f}; model in {out / 'final'}")
    return RunResult(out, losses, engine, plan)


def evaluate(engine: engine_mod.Engine, plan: Plan, info: dist.DistInfo) -> evaluation.EvalResult:
    """Eval loss plus the task's metric (harness.evaluation), identical on every rank."""
    return evaluation.evaluate(engine, plan.eval_set, info)


def log_eval(engine, plan, info, pad_id, logger, step: int) -> bool:
    """Evaluate, log, write eval/step-N.*, keep best/; True when early stopping says stop."""
    result = evaluate(engine, plan, info)
    logger.log(step, result.metrics)
    logger.write(evaluation.summary_line(step, result.metrics))
    out = Path(plan.cfg.output_dir)
    if info.is_rank0:
        evaluation.write_step(result, out, step)
    # Step 0 is the untrained baseline: a reference for the curve, not a candidate for best/.
    if step > 0 and plan.best.update(step, result.metrics):
        export.save_model(engine, plan, out, "best", info)
    return plan.best.should_stop


def save_hf_files(engine: engine_mod.Engine, plan: Plan, folder: Path) -> None:
    """What an HF folder needs besides the weights: config, generation config, tokenizer."""
    engine.module.config.save_pretrained(folder)
    if getattr(engine.module, "generation_config", None) is not None:
        engine.module.generation_config.save_pretrained(folder)
    plan.tokenizer.save_pretrained(folder)


def save_final(engine: engine_mod.Engine, plan: Plan, out: Path, info: dist.DistInfo) -> None:
    """Write final/ as a plain HF folder (config, safetensors, tokenizer) from any ZeRO stage;
    with --lora the adapter (and merged/ with --merge_lora)."""
    export.save_model(engine, plan, out, "final", info)
