"""Task evaluation: eval loss, label-constrained scoring or greedy generation, then the task's metric.

    python launch/evaluate.py --model runs/exp1/best --task qa --data dev.json --output_dir runs/exp1/eval-dev
    torchrun --nproc_per_node 2 launch/evaluate.py ... --ds_config zero3     # same metrics as 1 process

Used by the training loop (every --eval_steps and at the end) and by launch/evaluate.py. Rows are
sharded over ranks with `data.eval_batches`, which gives every rank the same number of batches
(filler slots on the short ranks), because under ZeRO-3 every forward is a collective that needs
every rank. Predictions are gathered onto every rank, so every rank computes the same metrics and
takes the same best-model and early-stopping decisions without another broadcast.

- `EVAL_MODE = "labels"` (classification): for each row the log-likelihood of every label's
  tokens (label word + EOS) given the prompt, all labels of a batch of rows in one forward; the
  argmax is the prediction.
- `EVAL_MODE = "generate"` (qa, summarization, ner, translation, chat): greedy decoding, left-padded
  batches, KV cache, `synced_gpus` under multi-rank ZeRO-3; the text up to the first stop token (EOS,
  and for chat the template's end-of-turn tokens) is the prediction. Chat generates for a sample only.
- Every task also gets the teacher-forced eval loss and perplexity of its targets.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from harness import data, dist, ds_config, engine as engine_mod, model as model_mod, tasks
from harness.errors import HarnessError
from harness.labels import IGNORE_INDEX
from harness.loss import supervised_tokens
from harness.tasks.common import Example, load_template

LOWER_IS_BETTER = {"loss", "ppl"}


@dataclass
class EvalSet:
    """Eval examples and everything resolved for them in preflight (tokens, label ids)."""

    task: ModuleType
    cfg: object
    examples: list[Example]
    loss_rows: list[data.TokenizedRow]
    prompts: list[list[int]]  # BOS + prompt tokens, truncated to leave room for the answer
    label_ids: list[list[int]]  # classification: each label's tokens + EOS
    label_words: list[str]  # classification: the --labels words, in the order of label_ids
    tokenizer: object
    pad_id: int
    eos_id: int
    stop_ids: list[int] = field(default_factory=list)  # generation ends at any of these (EOS when empty)


@dataclass
class EvalResult:
    metrics: dict  # "eval/<name>" -> number
    details: dict = field(default_factory=dict)  # e.g. the confusion matrix
    predictions: list[dict] = field(default_factory=list)


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded `fraction` of the examples (or tokenized rows): (train, eval), each in its
    original order."""
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise HarnessError(f"--eval_split {fraction} of {len(examples)} rows leaves nothing to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def examples_of(origins: list[tuple[int, int]], paths: list[str], task: ModuleType, cfg, template: str) -> list[Example]:
    """The task examples (prompts and references, for metrics) of some (source, row) origins, e.g.
    the rows --eval_split held out of --data (`data.TokenizedRows.origin`)."""
    wanted = set(origins)
    found = []
    for source, path in enumerate(paths):
        if any(s == source for s, _ in wanted):
            found += [e for e in task.examples(data.read_rows(path), cfg, template) if (source, e.row) in wanted]
    return found


def prepare(task: ModuleType, examples: list[Example], cfg, tokenizer, seq_len: int) -> EvalSet:
    """Tokenize eval examples for the loss and for the task's metric; check the metric's inputs."""
    if cfg.max_eval_samples:
        examples = examples[: cfg.max_eval_samples]
    label_ids: list[list[int]] = []
    label_words: list[str] = []
    if task.EVAL_MODE == "labels":
        label_ids = task.label_token_ids(cfg, tokenizer)
        label_words = task.parse_labels(cfg.labels)[0]
        room = max(len(ids) for ids in label_ids)
    else:
        room = cfg.max_new_tokens if task.EVAL_MODE == "generate" else 0
    if room > seq_len // 2:
        what = "--max_new_tokens" if task.EVAL_MODE == "generate" else "the longest label"
        raise HarnessError(f"{what} needs {room} tokens, more than half of seq_len {seq_len}; "
                           f"the prompt would be cut to nothing useful")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if hasattr(task, "eval_tokens"):  # conversations: the task tokenizes, and generates for a sample only
        loss_rows, prompts, stop_ids = task.eval_tokens(examples, cfg, tokenizer, seq_len, room)
        return EvalSet(task, cfg, examples, loss_rows, prompts, label_ids, label_words, tokenizer, pad_id,
                       tokenizer.eos_token_id, stop_ids)
    loss_rows, _ = data.tokenize(examples, tokenizer, seq_len)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    limit = data.char_limit(tokenizer, seq_len)  # text that could never fit is not tokenized (see harness.data)
    raw = tokenizer([data.cut_chars(e.prompt, limit, middle=True) for e in examples], add_special_tokens=False)["input_ids"]
    # The same truncation policy as training (cut the middle of the prompt), with the answer's
    # room standing in for the target.
    prompts = [data.truncate(bos + ids, [0] * room, seq_len)[0] for ids in raw]
    return EvalSet(task, cfg, examples, loss_rows, prompts, label_ids, label_words, tokenizer, pad_id,
                   tokenizer.eos_token_id)


def metric_for_best(task: ModuleType, cfg, has_eval: bool) -> tuple[str, bool]:
    """("eval/<name>", greater_is_better) for --metric_for_best, or an error naming the choices."""
    produced = ["loss", "ppl", *task.METRICS]
    name = (cfg.metric_for_best or task.MAIN_METRIC).removeprefix("eval/")
    if name not in produced:
        raise HarnessError(f"--metric_for_best {cfg.metric_for_best!r}: task {task.NAME} produces "
                           f"{', '.join(produced)}")
    if (cfg.metric_for_best or cfg.early_stopping_patience) and not has_eval:
        raise HarnessError("--metric_for_best/--early_stopping_patience need evaluation data: "
                           "give --eval_data or --eval_split")
    return f"eval/{name}", name not in LOWER_IS_BETTER


@dataclass
class BestTracker:
    """Best value of one metric over the evaluations of a run, and the early-stopping count."""

    metric: str
    greater_is_better: bool
    patience: int
    best: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0

    def update(self, step: int, metrics: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        value = metrics[self.metric]
        better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if better:
            self.best, self.best_step, self.evals_without_gain = value, step, 0
        else:
            self.evals_without_gain += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evals_without_gain >= self.patience

    def state(self) -> dict:
        """What a checkpoint keeps, so best/ and early stopping carry on where they were."""
        return {"metric": self.metric, "value": self.best, "step": self.best_step,
                "evals_without_gain": self.evals_without_gain}

    def restore(self, state: dict) -> None:
        if state["metric"] == self.metric:  # a resume under another --metric_for_best starts afresh
            self.best, self.best_step, self.evals_without_gain = state["value"], state["step"], state["evals_without_gain"]


# --- running an evaluation -----------------------------------------------------------------------


def evaluate(engine, es: EvalSet, info: dist.DistInfo) -> EvalResult:
    """Every rank calls this; every rank returns the same metrics."""
    engine.eval()
    metrics = eval_loss(engine, es.loss_rows, es.cfg.eval_batch_size, info, es.pad_id) if es.loss_rows else {}
    details: dict = {}
    predictions: list[dict] = []
    mode = es.task.EVAL_MODE
    if mode != "loss":
        local = score_rows(engine, es, info) if mode == "labels" else generate_rows(engine, es, info)
        records = sorted((r for part in dist.all_gather_objects(local) for r in part), key=lambda r: r["index"])
        scored = es.examples[: len(es.prompts)]  # every example, except for chat's generation sample
        assert [r["index"] for r in records] == list(range(len(scored)))
        task_metrics, details = es.task.compute_metrics([r["prediction"] for r in records], scored, es.cfg)
        metrics.update({f"eval/{k}": v for k, v in task_metrics.items()})
        for r, ex in zip(records, scored):
            predictions.append({"row": ex.row, "prediction": r["prediction"], "golds": list(ex.golds), **r["extra"]})
    return EvalResult(metrics, details, predictions)


def eval_loss(engine, rows: list[data.TokenizedRow], batch_size: int, info: dist.DistInfo, pad_id: int) -> dict:
    """Token-weighted loss over the eval rows, sharded over ranks."""
    loss_sum = tokens = 0.0
    for slots in data.eval_batches(len(rows), batch_size, info.rank, info.world_size):
        # Filler slots keep every rank in every ZeRO-3 forward; their labels are all masked.
        batch = data.collate([rows[i] if i is not None else data.filler_row(rows[0]) for i in slots], pad_id)
        loss_sum += engine.eval_loss_sum(batch)
        tokens += supervised_tokens(batch["labels"])
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens])
    loss = loss_sum / tokens
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 700.0))}


def label_scores(log_likelihood, prompts: list[list[int]], label_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """[rows, labels] log-likelihood of each label's tokens after each prompt, in one forward.

    `log_likelihood(batch)` returns the per-sequence sum of log-probabilities of the supervised
    tokens (Engine.sequence_log_likelihood); rows x labels sequences go through it at once.
    """
    seqs = [data.TokenizedRow(-1, prompt + label, [IGNORE_INDEX] * len(prompt) + label)
            for prompt in prompts for label in label_ids]
    return log_likelihood(data.collate(seqs, pad_id)).view(len(prompts), len(label_ids))


def score_rows(engine, es: EvalSet, info: dist.DistInfo) -> list[dict]:
    words = es.label_words
    out = []
    for slots in data.eval_batches(len(es.examples), es.cfg.eval_batch_size, info.rank, info.world_size):
        prompts = [es.prompts[i if i is not None else 0] for i in slots]
        scores = label_scores(engine.sequence_log_likelihood, prompts, es.label_ids, es.pad_id)
        for j, i in enumerate(slots):
            if i is not None:
                # argmax takes the first of equal scores, so ties resolve the same on every layout.
                out.append({"index": i, "prediction": words[int(scores[j].argmax())],
                            "extra": {"label_log_likelihoods": dict(zip(words, scores[j].tolist()))}})
    return out


def generate_rows(engine, es: EvalSet, info: dist.DistInfo) -> list[dict]:
    out = []
    stops = es.stop_ids or [es.eos_id]
    for slots in data.eval_batches(len(es.prompts), es.cfg.eval_batch_size, info.rank, info.world_size):
        prompts = [es.prompts[i if i is not None else 0] for i in slots]
        input_ids, attention_mask = left_pad(prompts, es.pad_id)
        new_tokens = engine.generate(input_ids, attention_mask, es.cfg.max_new_tokens, es.pad_id, stops)
        for j, i in enumerate(slots):
            if i is not None:
                tokens = new_tokens[j].tolist()
                ends = [k for k, t in enumerate(tokens) if t in stops]
                if ends:
                    tokens = tokens[: ends[0]]
                text = es.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                out.append({"index": i, "prediction": text, "extra": {}})
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation appends on the right, so every prompt must end at the same column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for j, p in enumerate(prompts):
        input_ids[j, width - len(p):] = torch.tensor(p)
        attention_mask[j, width - len(p):] = 1
    return input_ids, attention_mask


# --- writing results -------------------------------------------------------------------------------


def write_result(result: EvalResult, metrics_path: Path, predictions_path: Path, extra: dict | None = None) -> None:
    """Rank 0 only (the caller checks): metrics JSON and one prediction per line."""
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k.removeprefix("eval/"): v for k, v in result.metrics.items()}
    metrics_path.write_text(json.dumps({**(extra or {}), "metrics": metrics, **result.details}, indent=2) + "\n")
    with predictions_path.open("w") as f:
        for record in result.predictions:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_step(result: EvalResult, out: Path, step: int) -> None:
    write_result(result, out / "eval" / f"step-{step}.json", out / "eval" / f"step-{step}.predictions.jsonl",
                 {"step": step})


def summary_line(step: int, metrics: dict) -> str:
    shown = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.count("/") == 1}
    return f"step {step}: eval " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())


# --- standalone: launch/evaluate.py --------------------------------------------------------------


@dataclass(frozen=True)
class EvalSetup:
    """What launch/evaluate.py's preflight checked and resolved."""

    cfg: object
    model_path: str  # the folder holding weights (an adapter's base when the model is an adapter)
    adapter: str | None
    dtype: str
    attn: str
    ds_config: dict
    eval_set: EvalSet


def run(cfg) -> EvalResult:
    """Evaluate cfg.model on cfg.data; rank 0 writes metrics.json and predictions.jsonl."""
    info = engine_mod.init_distributed()
    setup = dist.checked_on_every_rank(preflight, cfg, info)
    engine = build_engine(setup)
    result = evaluate(engine, setup.eval_set, info)
    out = Path(cfg.output_dir)
    if info.is_rank0:
        write_result(result, out / "metrics.json", out / "predictions.jsonl",
                     {"model": cfg.model, "data": cfg.data, "task": cfg.task, "world_size": info.world_size,
                      "zero_stage": engine.zero_stage, "rows": len(setup.eval_set.examples)})
    dist.print0(summary_line(0, result.metrics).replace("step 0: ", "") + f"; written to {out}")
    dist.barrier()
    return result


def preflight(cfg, info: dist.DistInfo) -> EvalSetup:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"--output_dir {out} exists and is not a folder")
    raw_ds = ds_config.load(cfg.ds_config)
    adapter = cfg.model if model_mod.adapter_base(cfg.model) else None
    model_path = model_mod.adapter_base(cfg.model) or cfg.model
    model_config = model_mod.check_model_dir(model_path, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, model_config)
    dtype = model_mod.resolve_dtype(cfg.dtype, info.device)
    attn = model_mod.resolve_attention(cfg.attn, info.device, dtype)
    tokenizer = model_mod.load_tokenizer(cfg.model, cfg.trust_remote_code)
    task = tasks.get(cfg.task)
    tasks.setup_tokenizer(task, cfg, tokenizer)
    examples = task.examples(data.read_rows(cfg.data), cfg, load_template(cfg.template))
    eval_set = prepare(task, examples, cfg, tokenizer, seq_len)
    filled = ds_config.fill_for_inference(raw_ds, cfg.eval_batch_size, info.world_size, dtype)
    return EvalSetup(cfg=cfg, model_path=model_path, adapter=adapter, dtype=dtype, attn=attn, ds_config=filled,
                     eval_set=eval_set)


def build_engine(setup: EvalSetup) -> engine_mod.Engine:
    cfg = setup.cfg
    if setup.adapter:
        # peft cannot load an adapter into ZeRO-3 shards: merge on the CPU first, and the engine
        # then partitions the merged weights (for the largest models, evaluate final/merged/).
        model = model_mod.merge_adapter(setup.model_path, setup.adapter, setup.dtype, cfg.trust_remote_code)
    else:
        load_ctx = engine_mod.Zero3LoadContext(setup.ds_config)
        model = model_mod.load_model(setup.model_path, setup.dtype, setup.attn, False, cfg.trust_remote_code)
        load_ctx.release()
    return engine_mod.Engine(model, setup.ds_config)
