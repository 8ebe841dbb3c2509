"""Fine-tune a causal LM: preflight every input, then one training loop.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json --model M --data D --output_dir R
    torchrun --nproc_per_node 8 launch/train.py ...     # same flags
    python launch/train.py                               # one process, embedded default

Reading order: `run` (signal handlers, the run-directory lock, `harness.preflight.early_checks`
before the process group starts, then `harness.preflight.preflight`: everything that can be wrong
with the inputs, checked on every rank before any weights are loaded) -> `train` (load, resume,
the loop).
One optimizer step of the loop: data -> forward/backward micro-steps -> optimizer step -> loss
and stop vote -> bad-step guard -> log -> eval -> save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import checkpoint, dist, evaluation, export, rundir
from harness import model as model_mod
from harness.config import TrainConfig
from harness.engine import Engine, Zero3LoadContext, init_distributed
from harness.errors import CollectiveTimeout, RequeueRequested, TrainingAborted
from harness.batches import Prefetcher
from harness.metrics import MetricsLogger
from harness.preflight import TrainSetup, early_checks, preflight
from harness.schedule import lr_lambda
from harness.throughput import StepTimer, StepTokens, Window, flop_model, peak_flops, peak_memory


@dataclass
class RunResult:
    output_dir: Path
    losses: list[float]
    engine: Engine
    setup: TrainSetup
    best: evaluation.BestTracker


def run(cfg: TrainConfig) -> RunResult:
    dist.ensure_launcher_env()
    # Signal handlers first: a SIGUSR1/SIGTERM/Ctrl-C that arrives during the checks or while the
    # model loads is kept, and the run saves and stops at its first step boundary.
    with checkpoint.StopRequest() as stop, contextlib.ExitStack() as held:
        if dist.info().is_rank0:
            held.enter_context(rundir.RunLock(Path(cfg.output_dir)))  # one run per folder; the first write
        # Every check that needs no other rank, before the process group starts (and DeepSpeed
        # compiles its communication op on the CPU).
        early = early_checks(cfg, dist.info().device)
        info = init_distributed(cfg.collective_timeout_s)
        alive_every_s = dist.liveness_interval(cfg.collective_timeout_s)
        held.enter_context(dist.Liveness(alive_every_s))
        nonce = dist.shared_nonce()  # before any check can fail, so every rank reaches this collective
        setup = dist.checked_on_every_rank(preflight, cfg, info, nonce, early)
        deadline = held.enter_context(dist.StepDeadline(
            cfg.collective_timeout_s, lambda: fail_hung_step(info, cfg.collective_timeout_s, alive_every_s)))
        try:
            return train(setup, info, stop, deadline)
        except RequeueRequested:
            dist.destroy()  # the process exits next, asking to be requeued
            raise
        except RuntimeError as err:
            if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
                raise
            raise CollectiveTimeout(describe_hang(info, cfg.collective_timeout_s, err, alive_every_s)) from err


def train(setup: TrainSetup, info: dist.DistInfo, stop: checkpoint.StopRequest,
          deadline: dist.StepDeadline) -> RunResult:
    cfg, total = setup.cfg, setup.total_steps
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    engine = build_engine(setup)
    # Only now is anything in the run directory replaced: a model that fails to load leaves it as it was.
    rundir.prepare(out, setup.resume_from, setup.resume_state["step"] if setup.resume_state else 0, info)
    # Record the kernel transformers actually installed, not the one we asked for.
    setup = dataclasses.replace(setup, attn=getattr(engine.module.config, "_attn_implementation", None) or setup.attn)
    rundir.write_run_files(out, setup.resolved(), setup.report, info)

    best = evaluation.BestTracker(setup.metric_for_best, setup.greater_is_better, cfg.early_stopping_patience)
    guard = BadStepGuard(cfg.max_bad_steps, out / "checkpoints", lambda step: step_rows(setup, step))
    start_step, tokens_seen, last_saved = 0, 0, None
    if setup.resume_from is not None:
        checkpoint.restore(engine, setup.resume_from, info)
        state = setup.resume_state
        start_step = last_saved = state["step"]
        tokens_seen, guard.in_a_row = state["tokens_seen"], state["bad_steps"]
        best.restore(state["best"])
        dist.print0(f"resumed from {setup.resume_from} at step {start_step}")
    dist.print0(f"model {setup.model_path}: attention={setup.attn} dtype={setup.dtype} zero_stage={engine.zero_stage} "
                f"world_size={info.world_size} global_batch={setup.batch.global_batch_size} steps={total}")

    # The head runs on supervised positions only with --chunked_ce, and on packed rows (Engine.forward_loss_sum).
    flops = flop_model(engine.module, head_on_supervised=bool(cfg.chunked_ce) or (cfg.packing and engine.keeps_logits))
    peak, device_name = peak_flops(info.device, setup.dtype)
    dist.print0(f"throughput: {flops.linear_flops_per_token / 1e6:.3f} MFLOP per token in matmuls; "
                + (f"MFU against {peak / 1e12:.1f} TFLOP/s per device ({device_name}, {setup.dtype})" if peak else device_name))
    window, timer = Window(info.world_size, peak), StepTimer(info.device)
    losses: list[float] = []
    done = start_step

    def save(step: int) -> None:
        nonlocal last_saved
        t = timer.start("checkpoint")
        checkpoint.save(engine, out, step, trainer_state(setup, step, tokens_seen, guard.in_a_row, best),
                        lambda folder: save_hf_files(engine, setup, folder), info, cfg.keep_last)
        timer.stop(t)
        last_saved = step

    # The next step's batches are built on a background thread while the device runs this one;
    # pinned on a GPU so the engine's non_blocking copies overlap with compute.
    prefetch = Prefetcher(setup.batches, info.rank, total, pin=info.device.type == "cuda")
    with MetricsLogger(out, info.is_rank0, total, start_step) as logger, prefetch:
        if setup.evaluates and start_step == 0:
            evaluate_and_log(engine, setup, best, info, logger, 0)  # the baseline every later eval is read against
        engine.train()
        window.reset()  # training throughput: the step-0 evaluation is not training time
        for step in range(start_step + 1, total + 1):  # `step`: optimizer steps done once this one is
            done = step
            dist.heartbeat(step)
            step_start = time.perf_counter()
            lr = engine.lr()  # the rate this step's update uses; the scheduler advances inside the step
            logs = step % cfg.log_every == 0 or step == total

            # Data: this rank's micro-batches (padded or packed, the same samples either way) and the
            # step's counts on all ranks, which every rank derives from the rows' lengths on the host:
            # the supervised count that scales the loss is known before the first forward without a
            # collective or a device read.
            t = timer.start("data")
            data = prefetch.get(step - 1)
            timer.stop(t)

            # Forward/backward micro-steps accumulate the gradient of the token-weighted step loss;
            # then the optimizer step. The loss sums stay on the device.
            # Each phase arms the deadline that fails a step stuck waiting for a hung rank.
            local_loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
            for batch in data.micro_batches:
                deadline.arm()
                local_loss_sum += engine.forward_backward(batch, data.supervised, timer).double()
            deadline.arm()
            updated = engine.optimizer_step(timer)

            # The step's ONE device-to-host read (the sync budget; tests/test_sync.py counts it):
            # one all-reduce sums the loss (for the NaN guard and the log line) and the stop votes
            # ("has any rank been asked to stop"), and one copy brings them to the host, with the
            # gradient norm on log steps. It waits for the step to finish, which the reads inside
            # DeepSpeed's step (the overflow check, the clipping norm) already did.
            norm = engine.last_grad_norm() if logs else None
            deadline.arm()
            loss_sum, stop_votes, *read_norm = dist.sum_and_read([local_loss_sum, float(stop.requested)],
                                                                 [norm] if norm is not None else [])
            deadline.disarm()
            loss = loss_sum / data.supervised
            losses.append(loss)
            tokens_seen += data.real
            step_time = time.perf_counter() - step_start
            window.add(StepTokens(data.slots, data.real, data.supervised,
                                  flops.step_flops(data.real, data.sample_lengths, data.supervised)))

            guard.check(step, updated and math.isfinite(loss), loss, logger)

            if logs:
                # Rates, MFU and the phase breakdown cover every step since the last log line,
                # checkpoint saves included, evaluation excluded.
                rates = window.record()
                logger.log(step, {
                    "loss": loss, "lr": lr, "grad_norm": read_norm[0] if read_norm else None,
                    "tokens": tokens_seen, "supervised_tokens": data.supervised,
                    **rates, "step_time_s": step_time, **timer.take(), **peak_memory(info.device),
                    "epoch": step / setup.sampler.steps_per_epoch,
                })
                logger.progress(window.steps, loss, rates)
                window.reset()

            stop_early = False
            if setup.evaluates and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total:
                eval_start = time.perf_counter()
                stop_early = evaluate_and_log(engine, setup, best, info, logger, step)
                window.exclude(time.perf_counter() - eval_start)  # evaluation is not training throughput
                engine.train()
                if stop_early:
                    dist.print0(f"early stopping at step {step}: {best.metric} has not improved on {best.best:.4f} "
                                f"(step {best.best_step}) for {cfg.early_stopping_patience} evaluations")

            # An early stop ends the run here: its last step is saved like the last step of any run.
            if cfg.save_steps and (step % cfg.save_steps == 0 or step == total or stop_early):
                save(step)
            if stop_votes > 0:
                if last_saved != step:
                    save(step)
                # The batch script requeues on this marker: srun's exit status can be lost to another node's teardown.
                checkpoint.mark_requeue(out, out / "checkpoints" / f"step-{step}", info)
                message = (f"stop requested by signal: saved {out / 'checkpoints' / f'step-{step}'}; exiting with "
                           f"{RequeueRequested.exit_code} (resume with --resume auto)")
                logger.write(message)
                raise RequeueRequested(message)
            if stop_early:
                break

        if setup.evaluates and not best.should_stop:
            evaluate_and_log(engine, setup, best, info, logger, done)
        export.save_model(engine, setup, out, "final", info)
    if losses:
        dist.print0(f"done: {done} steps, final loss {losses[-1]:.4f}; model in {out / 'final'}")
    return RunResult(out, losses, engine, setup, best)


# -- the pieces of the loop ---------------------------------------------------------------------


def build_engine(setup: TrainSetup) -> Engine:
    """Load the model (sharded at load time under ZeRO-3), add LoRA adapters, wrap it in DeepSpeed."""
    cfg = setup.cfg
    load_ctx = Zero3LoadContext(setup.ds_config)
    model = model_mod.load_model(setup.model_path, setup.dtype, setup.attn, cfg.grad_ckpt, cfg.trust_remote_code)
    if cfg.lora:
        model = model_mod.apply_lora(model, cfg)
    # --chunked_ce: a fixed number of chunks per training forward, enough for the fullest micro-batch.
    ce_chunks = -(-cfg.micro_batch_size * setup.seq_len // cfg.chunked_ce) if cfg.chunked_ce else 0
    engine = Engine(model, setup.ds_config, lr_lambda(cfg, setup.total_steps), cfg.chunked_ce, ce_chunks)
    load_ctx.release()
    return engine


class BadStepGuard:
    """Counts consecutive optimizer steps DeepSpeed skipped for a non-finite loss or gradient
    norm, logs the data rows of each such step, and aborts after --max_bad_steps in a row."""

    def __init__(self, max_in_a_row: int, checkpoints: Path, rows_of_step):
        self.max_in_a_row, self.checkpoints, self.rows_of_step = max_in_a_row, checkpoints, rows_of_step
        self.in_a_row = 0  # carried in checkpoints, so a resume counts on

    def check(self, step: int, ok: bool, loss: float, logger: MetricsLogger) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        rows = self.rows_of_step(step)
        logger.log(step, {"skipped_step": 1, "bad_steps": self.in_a_row, "loss": loss, "sample_rows": rows})
        logger.write(f"step {step}: non-finite loss or gradient norm; update skipped "
                     f"({self.in_a_row} in a row); data rows {rows}")
        if self.in_a_row >= self.max_in_a_row:
            # Named only if its files still match their hashes (every rank checks a share: all are here).
            newest = checkpoint.newest_verified(self.checkpoints, warn=lambda _: None, content=True)
            raise TrainingAborted(f"{self.in_a_row} consecutive optimizer steps had a non-finite loss or gradient "
                                  f"norm (last at step {step}); aborting. Newest checkpoint that verifies by "
                                  f"content: {newest or 'none'}")


def step_rows(setup: TrainSetup, step: int) -> list[int]:
    """The data-file rows of (1-based) optimizer step `step`, all ranks together."""
    sampler = setup.sampler
    return [setup.train_rows[i].row for r in range(sampler.ws) for m in sampler.step(step - 1, r) for i in m]


def evaluate_and_log(engine: Engine, setup: TrainSetup, best: evaluation.BestTracker, info: dist.DistInfo,
                     logger: MetricsLogger, step: int) -> bool:
    """Evaluate, log, write eval/step-N.*, keep best/; True when early stopping says stop."""
    result = evaluation.evaluate(engine, setup.eval_set, info)
    logger.log(step, result.metrics)
    logger.write(evaluation.summary_line(step, result.metrics))
    out = Path(setup.cfg.output_dir)
    if info.is_rank0:
        evaluation.write_step(result, out, step)
    # Step 0 is the untrained baseline: a reference for the curve, not a candidate for best/.
    if step > 0 and best.update(step, result.metrics):
        export.save_model(engine, setup, out, "best", info)
    return best.should_stop


def trainer_state(setup: TrainSetup, step: int, tokens_seen: int, bad_steps: int, best: evaluation.BestTracker) -> dict:
    """A checkpoint's trainer_state.json: where the run is, and what it must match on resume."""
    sampler = setup.sampler
    return {"step": step, "epoch": step // sampler.steps_per_epoch,
            "rows_into_epoch": (step % sampler.steps_per_epoch) * sampler.global_batch,
            "micro_step": step * setup.cfg.grad_accum_steps, "tokens_seen": tokens_seen, "bad_steps": bad_steps,
            "global_batch_size": setup.batch.global_batch_size, "seed": setup.cfg.seed, "best": best.state(),
            **setup.fingerprints, "config": setup.resolved()}


def save_hf_files(engine: Engine, setup: TrainSetup, folder: Path) -> None:
    """What an HF folder needs besides the weights: config, generation config, tokenizer."""
    engine.module.config.save_pretrained(folder)
    if getattr(engine.module, "generation_config", None) is not None:
        engine.module.generation_config.save_pretrained(folder)
    setup.tokenizer.save_pretrained(folder)


def fail_hung_step(info: dist.DistInfo, timeout_s: int, alive_every_s: float) -> None:
    """The step deadline expired: this rank waits in a collective no timeout ends. Say who it waits
    for, then end the process (the main thread, stuck in the collective, cannot raise)."""
    message = describe_hang(info, timeout_s, None, alive_every_s)
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(CollectiveTimeout.exit_code)


def describe_hang(info: dist.DistInfo, timeout_s: int, err: Exception | None, alive_every_s: float) -> str:
    """Name the ranks the others waited for: behind in steps, or silent (a stopped process, a
    frozen host: at the same step, but its liveness beats have stopped while the others' went on)."""
    first = str(err).splitlines()[0] if err is not None else "none raised (the step's deadline expired)"
    try:
        beats, alive = dist.last_heartbeats(), dist.last_alive()
    except Exception as store_err:  # the store lives on rank 0's host: it may be what died
        return (f"rank {info.rank} waited more than --collective_timeout_s {timeout_s} in a collective; the rendezvous "
                f"store does not answer ({store_err}), so the lagging rank is unknown. First error: {first}")
    mine = beats.get(info.rank)
    newest = max((t for t in alive.values() if t is not None), default=None)
    laggards = []
    for r, s in sorted(beats.items()):
        if r == info.rank:
            continue
        silent = newest - alive[r] if newest is not None and alive.get(r) is not None else 0.0
        stopped = silent > dist.ALIVE_STALE_BEATS * alive_every_s
        if s is None or mine is None or s < mine or stopped:
            laggards.append(f"rank {r} (last at step {s}" + (f"; no sign of life for {silent:.0f} s: stopped, or its "
                                                             f"host is down" if stopped else "") + ")")
    who = ", ".join(laggards) or "unknown (no rank is behind or silent)"
    return (f"rank {info.rank} waited more than --collective_timeout_s {timeout_s} in a collective at step {mine}; "
            f"lagging: {who}. First error: {first}")
