"""Fine-tune a causal LM: preflight every input, then one training loop.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model M --data D --output_dir R
    torchrun --nproc_per_node 8 launch/train.py ...     # same flags
    python launch/train.py                               # one process, embedded default

Reading order: `run` -> `preflight` (everything that can be wrong with the inputs, checked on
every rank before any weights are loaded) -> `train_loop`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import __version__, data, dist, ds_config, engine as engine_mod, evaluation, export, model as model_mod, tasks
from harness.config import TrainConfig
from harness.errors import HarnessError
from harness.loss import supervised_tokens
from harness.metrics import MetricsLogger
from harness.schedule import lr_lambda, warmup_steps
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
    info = engine_mod.init_distributed()
    plan, error = None, None
    try:
        plan = preflight(cfg, info)
    except HarnessError as err:
        error = str(err)
    error = dist.agree(error)
    if error:
        raise HarnessError(error)
    return train_loop(plan, info)


def preflight(cfg: TrainConfig, info: dist.DistInfo) -> Plan:
    """Check every input and resolve every setting; raise HarnessError naming what is wrong."""
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)

    raw_ds = ds_config.load(cfg.ds_config)
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

    if cfg.lora:
        model_mod.check_lora_targets(model_config, cfg.lora_targets, cfg.trust_remote_code)

    task = tasks.get(cfg.task)
    template = load_template(cfg.template)
    train_examples = task.examples(data.read_rows(data_path), cfg, template)
    eval_examples = []
    if eval_path:
        eval_examples = task.examples(data.read_rows(eval_path, "--eval_data"), cfg, template)
    elif cfg.eval_split:
        train_examples, eval_examples = evaluation.split(train_examples, cfg.eval_split, cfg.seed)
    train_rows, stats = data.tokenize(train_examples, tokenizer, seq_len)
    eval_set = evaluation.prepare(task, eval_examples, cfg, tokenizer, seq_len) if eval_examples else None
    eval_rows = eval_set.loss_rows if eval_set else []
    best = evaluation.BestTracker(*evaluation.metric_for_best(task, cfg, eval_set is not None),
                                  cfg.early_stopping_patience)

    batch = ds_config.BatchPlan(cfg.micro_batch_size, cfg.grad_accum_steps, info.world_size)
    sampler = data.StepSampler(len(train_rows), batch.micro_batch_size, batch.grad_accum_steps,
                               batch.world_size, cfg.seed)
    total = data.total_steps(cfg.max_steps, cfg.epochs, sampler.steps_per_epoch)
    filled = ds_config.fill(raw_ds, cfg, batch, dtype, on_cpu=info.device.type == "cpu",
                            source=str(ds_config.resolve_path(cfg.ds_config)))
    return Plan(cfg, model_path, data_path, eval_path, seq_len, dtype, attn, batch, filled, total,
                sampler, train_rows, eval_rows, tokenizer,
                stats={"rows": stats.rows, "prompt_truncated": stats.prompt_truncated,
                       "target_truncated": stats.target_truncated,
                       "zero_supervised_dropped": stats.zero_supervised},
                eval_set=eval_set, best=best)


def default_model_dir_on_rank0_first(default_assets) -> Path:
    # The build is race-safe, but letting rank 0 build first spares the other ranks the work.
    if dist.info().is_rank0:
        path = default_assets.default_model_dir()
        dist.barrier()
    else:
        dist.barrier()
        path = default_assets.default_model_dir()
    return path


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--output_dir {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise HarnessError(f"--output_dir {out} is not empty; choose another folder or pass --overwrite")
    if not is_run_dir(out):
        raise HarnessError(f"--output_dir {out} is not empty and was not written by this harness "
                           f"(no config.json with harness_version); refusing to delete it even with --overwrite")


def is_run_dir(out: Path) -> bool:
    try:
        return "harness_version" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False


def prepare_output_dir(plan: Plan, info: dist.DistInfo) -> Path:
    out = Path(plan.cfg.output_dir)
    if info.is_rank0:
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)  # preflight proved it is our own run directory and --overwrite was given
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def write_config(plan: Plan, out: Path, info: dist.DistInfo) -> None:
    if info.is_rank0:
        (out / "config.json").write_text(json.dumps(plan.resolved(), indent=2) + "\n")


def train_loop(plan: Plan, info: dist.DistInfo) -> RunResult:
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    out = prepare_output_dir(plan, info)

    load_ctx = engine_mod.Zero3LoadContext(plan.ds_config)
    model = model_mod.load_model(plan.model_path, plan.dtype, plan.attn, cfg.grad_ckpt, cfg.trust_remote_code)
    if cfg.lora:
        model = model_mod.apply_lora(model, cfg)
    engine = engine_mod.Engine(model, plan.ds_config, lr_lambda(cfg, plan.total_steps))
    load_ctx.release()
    # Record the kernel transformers actually installed, not the one we asked for.
    plan.attn = getattr(engine.module.config, "_attn_implementation", None) or plan.attn
    write_config(plan, out, info)
    dist.print0(f"model {plan.model_path}: attention={plan.attn} dtype={plan.dtype} zero_stage={engine.zero_stage} "
                f"world_size={info.world_size} global_batch={plan.batch.global_batch_size} steps={plan.total_steps}")

    sampler = plan.sampler
    pad_id = plan.tokenizer.pad_token_id if plan.tokenizer.pad_token_id is not None else plan.tokenizer.eos_token_id
    logger = MetricsLogger(out, info.is_rank0, plan.total_steps)
    losses: list[float] = []
    tokens_seen = 0
    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0

    if plan.eval_rows:
        log_eval(engine, plan, info, pad_id, logger, 0)  # the baseline every later eval is read against
    engine.train()
    for step in range(plan.total_steps):
        step_start = time.perf_counter()
        lr = engine.lr()  # the rate this step's update uses; the scheduler advances inside the step
        micro_batches = [data.collate([plan.train_rows[i] for i in rows], pad_id)
                         for rows in sampler.step(step, info.rank)]
        local_supervised = sum(supervised_tokens(b["labels"]) for b in micro_batches)
        local_real = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        step_supervised, step_real = dist.all_reduce_sum([local_supervised, local_real])

        local_loss_sum = sum(engine.micro_step(b, step_supervised) for b in micro_batches)
        (loss_sum,) = dist.all_reduce_sum([local_loss_sum])  # also the step's sync point for timing
        loss = loss_sum / step_supervised
        losses.append(loss)
        tokens_seen += int(step_real)
        step_time = time.perf_counter() - step_start
        window_tokens += step_real
        window_steps += 1

        if (step + 1) % cfg.log_every == 0 or step + 1 == plan.total_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            logger.log(step + 1, {
                "loss": loss, "lr": lr, "grad_norm": engine.last_grad_norm(),
                "tokens": tokens_seen, "supervised_tokens": int(step_supervised),
                "tokens_per_s": tokens_per_s, "step_time_s": step_time,
                "epoch": (step + 1) / sampler.steps_per_epoch,
            })
            logger.progress(window_steps, loss, tokens_per_s)
            window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0

        if plan.eval_rows and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < plan.total_steps:
            if log_eval(engine, plan, info, pad_id, logger, step + 1):
                dist.print0(f"early stopping at step {step + 1}: {plan.best.metric} has not improved on "
                            f"{plan.best.best:.4f} (step {plan.best.best_step}) for {cfg.early_stopping_patience} evaluations")
                break
            engine.train()

    if plan.eval_rows and not plan.best.should_stop:
        log_eval(engine, plan, info, pad_id, logger, len(losses))
    save_final(engine, plan, out, info)
    logger.close()
    dist.print0(f"done: {len(losses)} steps, final loss {losses[-1]:.4f}; model in {out / 'final'}")
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


def save_final(engine: engine_mod.Engine, plan: Plan, out: Path, info: dist.DistInfo) -> None:
    """Write final/ as a plain HF folder (config, safetensors, tokenizer) from any ZeRO stage;
    with --lora the adapter (and merged/ with --merge_lora)."""
    export.save_model(engine, plan, out, "final", info)
