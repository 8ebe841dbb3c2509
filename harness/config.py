"""Every launcher's flags: frozen dataclasses whose fields are the command-line flags.

`TrainConfig` is the one source. `launch/train.py` exposes exactly its fields through
python-fire (see `harness.cli`), so the flag reference, `--help` and the `config.json` written
into every run directory all come from here. The other launchers' configs (`EvalConfig`,
`PrepareConfig`, `PlanConfig`, `BenchConfig`) are derived from it by `derive_config`: a flag
they share with training keeps training's name, type, default, doc and validation unless the
launcher says why it differs. `ExportConfig` shares nothing with training.

Validation that needs no files or devices happens in `__post_init__`; checks that need the
filesystem, the model or the world size live in `harness.preflight`. This module imports
nothing heavy, so every launcher parses its flags (and answers --help) before torch loads.

    python -m harness.config              # the flag table of launch/train.py, generated from TrainConfig
    python -m harness.config EvalConfig   # ... of another launcher (PrepareConfig, PlanConfig, BenchConfig, ExportConfig)
    python -m harness.config resume       # the flags that may change on --resume (MAY_CHANGE_ON_RESUME)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field

from harness.errors import HarnessError

DTYPES = ("auto", "bf16", "fp16", "fp32")
# Flags that change how a row becomes (prompt, target): part of the tokenization cache key.
TASK_FIELDS = ("instruction_field", "input_field", "output_field", "text_field", "label_field", "labels",
               "context_field", "question_field", "answers_field", "document_field", "summary_field",
               # chat (its template text enters the key through harness.tasks.chat.cache_key), ner, translation
               "messages_field", "message_keys", "role_names", "tokens_field", "tags_field", "entities_field",
               "source_field", "target_field", "source_lang", "target_lang")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
LR_SCHEDULES = ("cosine", "linear", "constant")


def flag(default, doc: str):
    """A dataclass field carrying its one-line flag documentation."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TrainConfig:
    # What to train.
    model: str = flag("", "Local Hugging Face model folder (config.json + safetensors). Empty: the embedded tiny default model.")
    data: str = flag("", "Training data: a .json/.jsonl/.csv/.parquet file or a datasets.save_to_disk folder. Empty: the bundled sample instructions.")
    eval_data: str = flag("", "Held-out data in the same layout; its loss is reported every eval_steps and at the end. Empty: none (the bundled eval set when data is the default).")
    task: str = flag("instruction", "Task that turns a row into (prompt, target) and defines its metric: instruction, classification, qa, summarization, chat, ner or translation.")
    template: str = flag("", "Prompt template with {field} placeholders, or a path to a text file holding one. Empty: the task's default template.")
    instruction_field: str = flag("instruction", "Row field holding the instruction (task=instruction).")
    input_field: str = flag("input", "Row field holding the optional input (task=instruction); a missing field counts as empty.")
    output_field: str = flag("output", "Row field holding the target response (task=instruction).")
    # Task-specific fields
    text_field: str = flag("text", "Row field(s) holding the text to classify, comma-separated for several (task=classification); the text whose entities --entities_field marks (task=ner).")
    label_field: str = flag("label", "Row field holding the label, a name or an integer (task=classification).")
    labels: str = flag("", "Label words, comma-separated (integer labels index them from 0), or a mapping like {0: 'negative', 1: 'positive'} (task=classification); the BIO tag names that integer tags index, e.g. O,B-PER,I-PER (task=ner).")
    context_field: str = flag("context", "Row field holding the passage (task=qa; official SQuAD JSON is read as is).")
    question_field: str = flag("question", "Row field holding the question (task=qa).")
    answers_field: str = flag("answers", "Row field holding the gold answers: a list of strings or of {text: ...} (task=qa).")
    document_field: str = flag("document", "Row field holding the document to summarize, e.g. dialogue for SAMSum (task=summarization).")
    summary_field: str = flag("summary", "Row field holding the reference summary (task=summarization).")
    # Conversations (task=chat)
    chat_template: str = flag("", "Chat template: a Jinja string, a file holding one, or the built-in chatml (task=chat). Empty: the tokenizer's own; a tokenizer without one is an error.")
    messages_field: str = flag("messages", "Row field holding the conversation, a list of messages (task=chat); without it, ShareGPT 'conversations' or Alpaca rows are read.")
    message_keys: str = flag("role,content", "Keys of a message's role and text (task=chat); ShareGPT's from,value are read too.")
    role_names: str = flag("", "More role names, mapped onto the template's roles, e.g. {'bot': 'assistant', 'tool': 'tool'} (task=chat); system/user/assistant and human/gpt are known.")
    chat_eval_generations: int = flag(16, "Generate the last assistant turn of the first N eval conversations into eval/step-N.predictions.jsonl (task=chat; 0: none). The eval loss covers every conversation.")
    # Named entities (task=ner)
    tokens_field: str = flag("tokens", "Row field holding the words of a CoNLL-style row (task=ner).")
    tags_field: str = flag("ner_tags", "Row field holding one BIO tag per word, as names or as ids with --labels (task=ner).")
    entities_field: str = flag("entities", "Row field holding entity spans of --text_field: {start, end, label} character offsets, end exclusive (task=ner).")
    # Translation (task=translation)
    source_field: str = flag("source", "Row field holding the source text; a dotted path reads nested fields, e.g. translation.de (task=translation).")
    target_field: str = flag("target", "Row field holding the reference translation; dotted paths as for source_field (task=translation).")
    source_lang: str = flag("", "Source language name, as the prompt shows it, e.g. German (task=translation; required).")
    target_lang: str = flag("", "Target language name, as the prompt shows it, e.g. English (task=translation; required).")
    trust_remote_code: bool = flag(False, "Allow the model folder to run its own Python code. Off unless you trust the folder.")

    # Where it goes.
    ds_config: str = flag("zero2", "DeepSpeed JSON config: a path, the name of a shipped one (zero2, zero3, zero2_offload, zero3_offload), or auto: the memory planner's pick for this model and machine (launch/plan.py).")
    output_dir: str = flag("runs/default", "Run directory: config.json, metrics.jsonl, tensorboard/, final/.")
    overwrite: bool = flag(False, "Replace an existing run directory (only one this harness wrote) instead of refusing.")

    # Checkpoints and failure handling.
    save_steps: int = flag(0, "Save a resumable checkpoint every N optimizer steps, and at the end (0: never).")
    keep_last: int = flag(3, "Keep the newest N verified checkpoints (0: keep all); the newest is never deleted.")
    resume: str = flag("", "Resume: 'auto' (newest verified checkpoint in output_dir, else a fresh start) or a checkpoint folder.")
    max_bad_steps: int = flag(5, "Abort after this many consecutive optimizer steps skipped for a non-finite loss or gradient norm.")
    collective_timeout_s: int = flag(1800, "Seconds a collective may wait for the other ranks before the job fails, naming the lagging rank.")

    # How long.
    max_steps: int = flag(0, "Optimizer steps to run; 0: derived from epochs.")
    epochs: float = flag(1.0, "Passes over the training data when max_steps is 0 (fractions allowed).")

    # Batch: global batch = micro_batch_size x grad_accum_steps x world size, computed once.
    micro_batch_size: int = flag(4, "Rows per forward pass on each rank.")
    grad_accum_steps: int = flag(1, "Micro-batches accumulated per optimizer step on each rank.")

    # Optimizer and schedule.
    lr: float = flag(2e-5, "Peak learning rate (AdamW).")
    weight_decay: float = flag(0.0, "AdamW decoupled weight decay.")
    adam_beta1: float = flag(0.9, "AdamW beta1.")
    adam_beta2: float = flag(0.999, "AdamW beta2.")
    adam_eps: float = flag(1e-8, "AdamW epsilon.")
    lr_schedule: str = flag("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    warmup_steps: int = flag(0, "Linear warmup steps from 0 to lr (exclusive with warmup_ratio).")
    warmup_ratio: float = flag(0.0, "Warmup as a fraction of all steps (exclusive with warmup_steps).")
    min_lr_ratio: float = flag(0.0, "Cosine/linear decay ends at lr x min_lr_ratio.")
    max_grad_norm: float = flag(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")

    # Model execution.
    seq_len: int = flag(0, "Maximum tokens per row (prompt + target); longer rows are truncated, prompt first. 0: min(2048, the model's maximum).")

    # Data pipeline
    packing: bool = flag(True, "Pack each step's samples into bins of up to seq_len tokens (best-fit decreasing), each micro-batch's bins into one unpadded row; no token attends across samples on any kernel. micro_batch_size then counts samples, not rows.")
    group_by_length: int = flag(0, "Unpacked path only (--packing False): sort rows by length within windows of N global batches so micro-batches pad less; 0: off.")
    num_proc: int = flag(0, "Processes that tokenize (datasets.map num_proc); 0: 1 for small data, else one per core up to 8.")
    data_cache: str = flag("", "Folder for tokenized data cached by content (data, tokenizer, template, task, masking, seq_len, version). Empty: $HARNESS_CACHE/tokenized or ~/.cache/llm-ft-harness/tokenized.")

    # Model execution, continued.
    dtype: str = flag("auto", "Training precision: auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32.")
    attn: str = flag("auto", "Attention kernel of padded batches, evaluation and generation: auto (flash_attention_2 when installed and supported, else sdpa), flash_attention_2, sdpa or eager. Packed rows always use the varlen kernels of harness/attention.py.")
    grad_ckpt: bool = flag(False, "Non-reentrant activation checkpointing: less memory, ~1/3 more compute.")

    # Bookkeeping.
    seed: int = flag(42, "Seed for data order and every RNG.")
    log_every: int = flag(1, "Write metrics every N optimizer steps.")
    # Throughput accounting
    chunked_ce: int = flag(0, "Compute the loss from the final hidden states in chunks of about N supervised tokens, recomputed in backward, so the logits of all positions are never held (0: off, the plain path).")
    eval_steps: int = flag(0, "Evaluate on eval_data every N optimizer steps (0: only at the end).")
    # Evaluation and LoRA
    eval_split: float = flag(0.0, "Hold out this seeded fraction of --data for evaluation when --eval_data is empty (0: none).")
    eval_batch_size: int = flag(8, "Eval rows per forward on each rank (label scoring runs rows x labels sequences).")
    max_new_tokens: int = flag(32, "Greedy generation length limit for generative metrics (task=qa, summarization, ner, translation, chat).")
    max_eval_samples: int = flag(0, "Evaluate on the first N eval rows only (0: all).")
    metric_for_best: str = flag("", "Metric that picks best/ and drives early stopping, e.g. accuracy or loss. Empty: the task's main metric.")
    early_stopping_patience: int = flag(0, "Stop after this many evaluations in a row without a better metric_for_best (0: never stop early).")
    lora: bool = flag(False, "Train LoRA adapters (peft) instead of all weights; final/ then holds the adapter.")
    lora_r: int = flag(8, "LoRA rank.")
    lora_alpha: float = flag(16.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).")
    lora_dropout: float = flag(0.0, "Dropout on the LoRA branch input.")
    lora_targets: str = flag("q_proj,k_proj,v_proj,o_proj", "Comma-separated module names that get adapters, or all-linear.")
    merge_lora: bool = flag(False, "With --lora, also write final/merged/: a full model with the adapter merged in.")
    local_rank: int = flag(-1, "Set by the deepspeed launcher; the harness reads LOCAL_RANK from the environment instead.")

    def __post_init__(self):
        _coerce_types(self)
        _raise_if(train_flag_errors(self))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Flags that may differ from the checkpoint's run on --resume, and why; every other flag must be
# equal or the resume is refused, naming the differences. What changed is recorded in config.json
# ("changed_on_resume"). docs/checkpoints.md shows this table.
MAY_CHANGE_ON_RESUME = {
    "output_dir": "where the run writes, not what it computes",
    "resume": "how the checkpoint is found",
    "overwrite": "cannot be set with --resume",
    "local_rank": "set by the launcher",
    "model": "the folder may move: its config must match the checkpoint's (model fingerprint), and the weights come from the checkpoint",
    "data": "the file may move: its tokenized rows must match the checkpoint's (data fingerprint)",
    "micro_batch_size": "with the same global batch (checked): the same rows per step, split otherwise (e.g. on another world size)",
    "grad_accum_steps": "as --micro_batch_size",
    "max_steps": "the run's length; refused when the LR schedule depends on it (cosine or linear decay, or --warmup_ratio) and the total number of steps changes, since the rate would jump at the resume",
    "epochs": "as --max_steps",
    "save_steps": "when checkpoints are written",
    "keep_last": "how many are kept",
    "eval_steps": "when evaluations run (best/ and early stopping then see more or fewer of them)",
    "log_every": "how often metrics are written",
    "collective_timeout_s": "failure detection only",
    "max_bad_steps": "failure handling only",
    "ds_config": "the file may move or be renamed: its filled content must match (batch sizes aside, checked above)",
    "dtype": "'auto' may be spelled out: the resolved precision must match",
    "seq_len": "0 may be spelled out: the resolved seq_len must match",
    "attn": "the same attention computed by another kernel",
    "grad_ckpt": "the same gradients, recomputed",
    "chunked_ce": "the same loss, computed in chunks",
    "num_proc": "tokenization speed only",
    "data_cache": "where tokenized data is cached",
    "eval_batch_size": "evaluation speed and memory only",
    "trust_remote_code": "a permission, not a setting: the model's config must match anyway",
    "merge_lora": "what final/ holds besides the adapter",
}


def train_flag_errors(cfg) -> list[str]:
    """Training's rules for its flags; derived configs apply them to the flags they share."""
    errors = []
    if cfg.dtype not in DTYPES:
        errors.append(f"--dtype {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.attn not in ATTN_IMPLEMENTATIONS:
        errors.append(f"--attn {cfg.attn!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        errors.append(f"--lr_schedule {cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    for name in ("micro_batch_size", "grad_accum_steps", "log_every", "eval_batch_size", "max_new_tokens", "lora_r"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "seq_len", "warmup_steps", "eval_steps", "max_eval_samples", "early_stopping_patience",
                 "save_steps", "keep_last", "chunked_ce", "chat_eval_generations"):
        if getattr(cfg, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        errors.append(f"--max_steps is 0 and --epochs is {cfg.epochs}: nothing to train; set one of them")
    if cfg.lr <= 0:
        errors.append(f"--lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps > 0 and cfg.warmup_ratio > 0:
        errors.append(f"--warmup_steps {cfg.warmup_steps} and --warmup_ratio {cfg.warmup_ratio} contradict; set only one")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append(f"--warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        errors.append(f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.max_grad_norm < 0:
        errors.append(f"--max_grad_norm must be >= 0 (0 disables clipping), got {cfg.max_grad_norm}")
    if cfg.weight_decay < 0:
        errors.append(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            errors.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.adam_eps <= 0:
        errors.append(f"--adam_eps must be > 0, got {cfg.adam_eps}")
    if cfg.lora_alpha <= 0:
        errors.append(f"--lora_alpha must be > 0, got {cfg.lora_alpha}")
    if cfg.max_bad_steps < 1:
        errors.append(f"--max_bad_steps must be >= 1, got {cfg.max_bad_steps}")
    if cfg.collective_timeout_s < 1:
        errors.append(f"--collective_timeout_s must be >= 1, got {cfg.collective_timeout_s}")
    if cfg.resume and cfg.overwrite:
        errors.append("--resume and --overwrite contradict: one continues the run in output_dir, the other deletes it")
    if not cfg.output_dir:
        errors.append("--output_dir must not be empty")
    if cfg.group_by_length < 0 or cfg.num_proc < 0:
        errors.append(f"--group_by_length and --num_proc must be >= 0, got {cfg.group_by_length}, {cfg.num_proc}")
    if cfg.group_by_length and cfg.packing:
        errors.append("--group_by_length sorts rows for the unpacked path; it needs --packing False")
    if not 0 <= cfg.eval_split < 1:
        errors.append(f"--eval_split must be in [0, 1), got {cfg.eval_split}")
    if cfg.eval_split and cfg.eval_data:
        errors.append(f"--eval_split {cfg.eval_split} and --eval_data {cfg.eval_data} contradict; set only one")
    if not 0 <= cfg.lora_dropout < 1:
        errors.append(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.merge_lora and not cfg.lora:
        errors.append("--merge_lora needs --lora")
    return errors


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise HarnessError("invalid flags:\n  " + "\n  ".join(errors))


def flag_docs(cls=TrainConfig) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def _coerce_types(cfg) -> None:
    """Make every field the type its annotation says.

    python-fire parses flag values as Python literals, so `--model 7` arrives as an int and
    `--lr 1` as an int; a frozen config must hold what its annotation promises.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        want, value = hints[f.name], getattr(cfg, f.name)
        try:
            if want is bool:
                if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                    value = value.lower() in ("true", "1")
                if not isinstance(value, bool):
                    raise ValueError
            elif want is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif want is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    # No flag means anything by NaN or infinity: "--lr inf" would train one update
                    # into non-finite weights, "--lr nan" crash inside the optimizer.
                    raise HarnessError(f"--{f.name} must be a finite number, got {value}")
            elif want is str:
                value = str(value)
        except (TypeError, ValueError):
            raise HarnessError(f"--{f.name} expects {want.__name__}, got {value!r}") from None
        object.__setattr__(cfg, f.name, value)


def flags_table(cls=TrainConfig) -> str:
    """A flag reference generated from a config dataclass: `python -m harness.config`."""
    lines = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = '""' if f.default == "" else repr(f.default)
        lines.append(f"| `--{f.name}` | `{default}` | {f.metadata.get('doc', '')} |")
    return "\n".join(lines)


# -- the other launchers' flags, derived from TrainConfig -------------------------------------------

def derive_config(name: str, own: list[tuple[str, type, object]], shared: tuple[str, ...], *,
                  defaults: dict | None = None, docs: dict[str, str] | None = None, check=None):
    """A launcher's flag dataclass: its `own` fields (name, type, flag(...)), then the `shared`
    fields of TrainConfig with training's type, default and doc; `defaults` and `docs` override
    those where the launcher's meaning differs. Shared flags are validated by training's rules
    (`train_flag_errors`), own ones by `check(cfg) -> list of errors`."""
    hints = typing.get_type_hints(TrainConfig)
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults, docs = defaults or {}, docs or {}
    fields = own + [(n, hints[n], flag(defaults.get(n, train_fields[n].default), docs.get(n, train_fields[n].metadata["doc"])))
                    for n in shared]
    train_defaults = {n: f.default for n, f in train_fields.items()}

    def __post_init__(self):
        _coerce_types(self)
        # Training's rules see this launcher's values for the shared flags, training's defaults for the rest.
        as_train = types.SimpleNamespace(**{**train_defaults, **{n: getattr(self, n) for n in shared}})
        _raise_if(train_flag_errors(as_train) + (check(self) if check else []))

    cls = dataclasses.make_dataclass(name, fields, frozen=True,
                                     namespace={"__post_init__": __post_init__, "to_dict": dataclasses.asdict})
    cls.__module__ = __name__
    return cls


def _required(*names: str):
    return lambda cfg: [f"--{n} is required" for n in names if not getattr(cfg, n)]


# launch/evaluate.py
EvalConfig = derive_config(
    "EvalConfig",
    own=[("model", str, flag("", "Model to evaluate: a local HF folder, a run's final/ or best/ (a LoRA adapter folder is merged into its base).")),
         ("data", str, flag("", "Evaluation data: a .json/.jsonl/.csv/.tsv/.parquet file or a save_to_disk folder, in the task's layout.")),
         ("output_dir", str, flag("eval_out", "Folder that receives metrics.json and predictions.jsonl."))],
    shared=("task", "template", *TASK_FIELDS, "chat_template", "chat_eval_generations", "trust_remote_code", "ds_config",
            "seq_len", "dtype", "attn", "seed", "eval_batch_size", "max_new_tokens", "max_eval_samples", "local_rank"),
    # ZeRO-3 by default: evaluation has no optimizer state, so sharding the weights is the only
    # reason to use DeepSpeed here, and it lets a model larger than one device be evaluated.
    defaults={"ds_config": "zero3"},
    # The memory planner plans training (optimizer state, activations); evaluation has neither.
    docs={"ds_config": "DeepSpeed JSON config: a path, or the name of a shipped one (zero2, zero3, zero2_offload, zero3_offload)."},
    check=_required("model", "data", "output_dir"),
)

# launch/prepare_data.py: tokenizes exactly as the training run with the same flags will, and
# estimates its bins' fill rate for the run's batch.
PrepareConfig = derive_config(
    "PrepareConfig",
    own=[("output", str, flag("", "Folder to write; pass it to launch/train.py --data.")),
         ("overwrite", bool, flag(False, "Replace an existing output folder written by this step.")),
         ("world_size", int, flag(1, "Ranks of the training run, for the fill-rate estimate of its bins."))],
    shared=("data", "model", "task", "template", *TASK_FIELDS, "chat_template", "trust_remote_code", "seq_len", "num_proc",
            "micro_batch_size", "grad_accum_steps", "seed"),
    docs={"data": "Data file to tokenize (.json/.jsonl/.csv/.tsv/.parquet or a save_to_disk folder).",
          "model": "Local model folder whose tokenizer to use (as training's --model). Empty: the embedded tiny default model.",
          "micro_batch_size": "Samples per micro-batch of the training run (fill-rate estimate).",
          "grad_accum_steps": "Micro-batches per step of the training run (fill-rate estimate).",
          "seed": "Seed of the training run (fill-rate estimate)."},
    check=lambda cfg: _required("data", "output")(cfg) + ([] if cfg.world_size >= 1 else
                                                          [f"--world_size must be >= 1, got {cfg.world_size}"]),
)


def _plan_errors(cfg) -> list[str]:
    errors = [] if bool(cfg.model) != bool(cfg.model_config) else ["give exactly one of --model and --model_config"]
    errors += [f"--world_size must be >= 1, got {cfg.world_size}"] if cfg.world_size < 1 else []
    errors += ["--gpu_gib and --host_gib must be > 0"] if cfg.gpu_gib <= 0 or cfg.host_gib <= 0 else []
    return errors + ([f"--gpus_per_node must be >= 0, got {cfg.gpus_per_node}"] if cfg.gpus_per_node < 0 else [])


# launch/plan.py (and --ds_config auto): the memory planner.
PlanConfig = derive_config(
    "PlanConfig",
    own=[("model_config", str, flag("", "Instead of --model: a config.json path or a JSON object of config fields (model_type defaults to llama).")),
         ("world_size", int, flag(1, "GPUs in the job.")),
         ("gpus_per_node", int, flag(0, "GPUs per host; 0: min(world_size, 8).")),
         ("gpu_gib", float, flag(80.0, "Memory per GPU in GiB.")),
         ("host_gib", float, flag(128.0, "Memory per host in GiB."))],
    shared=("model", "trust_remote_code", "micro_batch_size", "seq_len", "grad_ckpt"),
    docs={"model": "Local HF model folder; only its config.json is read.",
          "micro_batch_size": "Rows per forward on each GPU, as in training (for the activation estimate).",
          "seq_len": "Tokens per row, as in training (for the activation estimate). 0: min(2048, the model's maximum).",
          "grad_ckpt": "Plan for activation checkpointing, as training's --grad_ckpt does."},
    check=_plan_errors,
)


BENCH_BASELINES = ("trainer", "trl")


def _bench_errors(cfg) -> list[str]:
    errors = [f"--{n} must be >= 1, got {getattr(cfg, n)}" for n in ("max_steps", "seq_len", "repeats")
              if getattr(cfg, n) < 1]
    names = [s.strip() for s in cfg.baselines.split(",") if s.strip()]
    if cfg.baselines != "auto" and (not names or set(names) - set(BENCH_BASELINES) or len(set(names)) < len(names)):
        errors.append(f"--baselines {cfg.baselines!r}: auto, or a comma-separated list of {', '.join(BENCH_BASELINES)}")
    return errors + ([] if cfg.dtype in ("fp32", "bf16") else [f"--dtype must be fp32 or bf16, got {cfg.dtype!r}"])


# launch/benchmark.py: one side is this harness trained with these flags, the others
# transformers.Trainer and TRL's SFTTrainer on the same rows.
BenchConfig = derive_config(
    "BenchConfig",
    own=[("baselines", str, flag("auto", "Sides run beside the harness: trainer, trl, or both comma-separated; auto: the Trainer, plus TRL's SFTTrainer when trl is installed.")),
         ("baseline_attn", str, flag("auto", "Attention kernel of the baselines: auto (flash_attention_2 when installed and supported, else sdpa), or any registered name.")),
         ("repeats", int, flag(2, "Runs per side, alternating which goes first.")),
         ("output", str, flag("benchmark.json", "Where the JSON goes; the table is printed and written next to it (.md)."))],
    shared=("model", "data", "task", "template", *TASK_FIELDS, "ds_config", "max_steps", "micro_batch_size", "seq_len",
            "dtype", "lr", "seed"),
    defaults={"max_steps": 20, "micro_batch_size": 8, "seq_len": 512, "dtype": "fp32", "lr": 1e-4},
    docs={"data": "Training data (any --data the harness accepts). Empty: the bundled sample instructions.",
          "ds_config": "DeepSpeed config every side uses: a path or a shipped name.",
          "max_steps": "Optimizer steps per run of the harness and the Trainer; TRL stops at the same number of samples.",
          "micro_batch_size": "Samples per optimizer step (one process, no accumulation); TRL's packed steps hold this many on average.",
          "seq_len": "Maximum tokens per sample.",
          "dtype": "fp32 or bf16 (fp16 is refused by DeepSpeed on the CPU).",
          "lr": "Constant learning rate on every side.",
          "seed": "Seed for every side."},
    check=_bench_errors,
)


@dataclass(frozen=True)
class ExportConfig:
    """launch/export.py: everything it needs comes from the checkpoint, so it shares no training flag."""

    checkpoint: str = flag("", "A checkpoint folder (output_dir/checkpoints/step-N) or a run directory (its newest checkpoint).")
    out: str = flag("", "Folder to write the Hugging Face model into; must not exist or be empty.")
    dtype: str = flag("auto", "Weight dtype: auto (the training precision), fp32, bf16 or fp16.")
    max_shard_size: str = flag("5GB", "Largest safetensors shard, e.g. 5GB or 500MB.")

    def __post_init__(self):
        if not self.checkpoint or not self.out:
            raise HarnessError("usage: launch/export.py CHECKPOINT OUT [--dtype ...] [--max_shard_size ...]")
        if self.dtype not in DTYPES:
            raise HarnessError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


def resume_table() -> str:
    """The flags that may change on --resume and why: `python -m harness.config resume`."""
    return "\n".join(["| flag | why it may change |", "| --- | --- |",
                      *(f"| `--{name}` | {why} |" for name, why in MAY_CHANGE_ON_RESUME.items())])


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "TrainConfig"
    print(resume_table() if what == "resume" else flags_table(globals()[what]))
