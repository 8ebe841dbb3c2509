"""DeepSpeed JSON configs: load, check against the flags, fill every "auto".

The flags are the single source of truth for batch sizes, optimizer hyper-parameters,
precision and clipping. A shipped config says "auto" for all of them; a user's config may
spell a value out, but only if it agrees with the flag, otherwise we stop and name both.

The LR schedule is owned by the harness (`harness.schedule`), not by a DeepSpeed "scheduler"
block: DeepSpeed's Warmup* schedulers force at least 2 warmup steps and default to a log-shaped
warmup, which would silently change what --warmup_steps means. A "scheduler" block is an error.

Keys starting with "_" are comments (JSON has none): `_usage` opens every shipped config with
the command that uses it. They are dropped before DeepSpeed sees the dict.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from harness.config import TrainConfig
from harness.errors import HarnessError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
AUTO = "auto"


@dataclass(frozen=True)
class BatchSizes:
    """The one batch computation: every other batch number is derived from this."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def rows_per_rank_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


def resolve_path(name_or_path: str) -> Path:
    """A path as given, or the name of a shipped config (``zero3`` -> ds_configs/zero3.json)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.json")))
    raise HarnessError(f"--ds_config {name_or_path}: no such file (shipped configs: {names})")


def load(name_or_path: str) -> dict:
    path = resolve_path(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HarnessError(f"--ds_config {path}: invalid JSON: {err}") from None
    except OSError as err:
        raise HarnessError(f"--ds_config {path}: cannot read: {err}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"--ds_config {path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def zero_stage(raw: dict) -> int:
    return int(raw.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(raw: dict) -> bool:
    return raw.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def fill(raw: dict, cfg: TrainConfig, batch: BatchSizes, dtype: str, on_cpu: bool, source: str = "ds_config") -> dict:
    """Return a copy of `raw` with every "auto" filled from the flags, or raise on contradictions."""
    ds = {k: copy.deepcopy(v) for k, v in raw.items() if not k.startswith("_")}
    errors: list[str] = []

    def put(section: dict, key: str, value, flag: str, where: str):
        have = section.get(key, AUTO)
        if have == AUTO:
            section[key] = value
        elif not _same(have, value):
            errors.append(f"{source} sets {where}={json.dumps(have)} but {flag} gives {json.dumps(value)}; "
                          f"set it to \"auto\" or make them agree")

    batch_flags = (f"--micro_batch_size {batch.micro_batch_size} x --grad_accum_steps {batch.grad_accum_steps}"
                   f" x world size {batch.world_size}")
    put(ds, "train_micro_batch_size_per_gpu", batch.micro_batch_size, "--micro_batch_size", "train_micro_batch_size_per_gpu")
    put(ds, "gradient_accumulation_steps", batch.grad_accum_steps, "--grad_accum_steps", "gradient_accumulation_steps")
    put(ds, "train_batch_size", batch.global_batch_size, batch_flags, "train_batch_size")
    put(ds, "gradient_clipping", cfg.max_grad_norm, "--max_grad_norm", "gradient_clipping")

    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        put(section, "enabled", dtype == name, f"--dtype {dtype}", f"{name}.enabled")

    if dtype == "bf16" and zero_stage(ds) >= 1:
        # DeepSpeed accumulates micro-batch gradients in the model's dtype unless told otherwise;
        # bf16 keeps 8 bits of mantissa, so summing grad_accum_steps micro-batches there loses the
        # small ones. The fp32 buffers take 4 bytes per accumulated gradient element instead of 2
        # (ZeRO-2/3 hold only their partition). A user's explicit value is kept.
        types = ds.setdefault("data_types", {})
        if types.get("grad_accum_dtype", AUTO) == AUTO:
            types["grad_accum_dtype"] = "fp32"

    if "scheduler" in ds:
        errors.append(f"{source} has a \"scheduler\" block; the LR schedule comes from --lr_schedule, "
                      f"--warmup_steps/--warmup_ratio and --min_lr_ratio: remove the block")

    opt = ds.get("optimizer")
    if opt is None:
        errors.append(f"{source} has no \"optimizer\" block; add {{\"type\": \"AdamW\", \"params\": {{\"lr\": \"auto\", ...}}}}")
    else:
        if opt.get("type", "").lower() not in ("adamw", "adam"):
            errors.append(f"{source} optimizer.type={opt.get('type')!r}: only AdamW/Adam are supported")
        params = opt.setdefault("params", {})
        put(params, "lr", cfg.lr, "--lr", "optimizer.params.lr")
        put(params, "weight_decay", cfg.weight_decay, "--weight_decay", "optimizer.params.weight_decay")
        put(params, "betas", [cfg.adam_beta1, cfg.adam_beta2], "--adam_beta1/--adam_beta2", "optimizer.params.betas")
        put(params, "eps", cfg.adam_eps, "--adam_eps", "optimizer.params.eps")
        if on_cpu and not offloads_optimizer(ds):
            # DeepSpeed's default Adam is FusedAdam, a GPU kernel that on a CPU accelerator is
            # JIT-compiled (~1 min) for no gain over torch's own implementation.
            params.setdefault("torch_adam", True)

    leftovers = [path for path in _auto_paths(ds)]
    if leftovers:
        errors.append(f"{source}: the harness does not know how to fill {', '.join(leftovers)}; give explicit values")
    if errors:
        raise HarnessError("DeepSpeed config contradicts the flags:\n  " + "\n  ".join(errors))
    ds.setdefault("steps_per_print", 10**9)  # the harness logs; DeepSpeed's own step prints are noise
    return ds


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def _auto_paths(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}.{key}" if prefix else key)
    elif node == AUTO:
        yield prefix


def fill_for_inference(raw: dict, batch_size: int, world_size: int, dtype: str) -> dict:
    """The config for an evaluation-only engine: the ZeRO section and precision of `raw`.

    There is no optimizer, so the optimizer block and gradient clipping are dropped, and the batch
    fields (which DeepSpeed insists on) describe the eval batch: a training config's own values
    for them say nothing about evaluation and are replaced rather than compared.
    """
    ds = {k: copy.deepcopy(v) for k, v in raw.items() if not k.startswith("_") and k not in ("optimizer", "scheduler")}
    ds.pop("gradient_clipping", None)
    if zero_stage(ds) in (1, 2):
        # Stages 1-2 shard only optimizer state and gradients, which inference has none of (and
        # DeepSpeed refuses them without an optimizer): every rank holds the weights either way.
        ds["zero_optimization"] = {"stage": 0}
    ds.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=1,
              train_batch_size=batch_size * world_size)
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if section.get("enabled", AUTO) == AUTO:
            section["enabled"] = dtype == name
        elif bool(section["enabled"]) != (dtype == name):
            raise HarnessError(f"ds_config sets {name}.enabled={json.dumps(section['enabled'])} but --dtype is {dtype}")
    leftovers = list(_auto_paths(ds))
    if leftovers:
        raise HarnessError(f"ds_config: the harness does not know how to fill {', '.join(leftovers)} for evaluation")
    ds.setdefault("steps_per_print", 10**9)
    return ds
