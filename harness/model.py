"""Model and tokenizer: checks before loading, precision and attention choice, loading.

Only local folders are read (HF_HUB_OFFLINE is forced by the launcher), weights only from
safetensors, and the folder's own Python code runs only with --trust_remote_code.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from harness.errors import HarnessError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SEQ_LEN = 2048


def check_model_dir(path: str, trust_remote_code: bool):
    """Read and vet the model's config (cheap) before any weights are touched."""
    folder = Path(path)
    if not folder.is_dir():
        raise HarnessError(f"--model {path}: no such folder (a local Hugging Face model folder is expected; "
                           f"nothing is downloaded at run time)")
    if not (folder / "config.json").is_file():
        raise HarnessError(f"--model {path}: no config.json in the folder")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as err:
        raise HarnessError(f"--model {path}: cannot read config.json: {err}") from None
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (remote_causal and trust_remote_code):
        raise HarnessError(f"--model {path}: model_type {config.model_type!r} is not a causal (decoder) LM")
    why = not_decoder_only(config)
    if why:
        raise HarnessError(f"--model {path}: {why}; this harness fine-tunes decoder-only causal LMs")
    check_weight_files(folder, path)
    check_weights_match(path, trust_remote_code)
    return config


def not_decoder_only(config) -> str | None:
    """Why a config that transformers can load as a causal LM is not a decoder-only one, or None.

    Having a causal-LM class is not enough: transformers wraps encoders (BERT, RoBERTa, ELECTRA...)
    and the decoder half of encoder-decoders (BART...) in one, and would train e.g. a masked-LM
    BERT folder as a causal LM, from a head and attention it was never trained with.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        return f"model_type {config.model_type!r} is an encoder-decoder model (is_encoder_decoder is true)"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return (f"model_type {config.model_type!r} is an encoder (a masked-LM family; architectures "
                f"{architectures or 'not given'}, is_decoder is false)")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    masked = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
    if architectures and not causal & set(architectures) and masked & set(architectures):
        return f"its architectures {architectures} are masked-LM heads, not a causal LM"
    return None


def check_weight_files(folder: Path, path: str) -> None:
    """Every safetensors file has a readable header that covers the file, and every shard an index
    names exists: a truncated or missing shard fails here, not minutes later inside the load."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HarnessError(f"--model {path}: no *.safetensors weights (only safetensors are loaded, "
                           f"never pickled .bin files)")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise HarnessError(f"--model {path}: cannot read {index.name} ({err})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise HarnessError(f"--model {path}: {index.name} names shards that are not in the folder: "
                               f"{', '.join(missing)}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type (and OSError) for a bad header
            raise HarnessError(f"--model {path}: {file.name} is damaged or truncated ({err})") from None


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def resolve_seq_len(requested: int, config) -> int:
    limit = max_positions(config)
    if requested == 0:
        return min(DEFAULT_MAX_SEQ_LEN, limit) if limit else DEFAULT_MAX_SEQ_LEN
    if limit and requested > limit:
        raise HarnessError(f"--seq_len {requested} exceeds the model's maximum of {limit} positions "
                           f"(max_position_embeddings)")
    return requested


def resolve_dtype(requested: str, device: torch.device) -> str:
    cuda = device.type == "cuda"
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise HarnessError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bf16; "
                           f"use --dtype fp16 or fp32")
    if requested == "fp16" and not cuda:
        raise HarnessError("--dtype fp16 needs a GPU (DeepSpeed's fp16 path is not supported on CPU); "
                           "use bf16 or fp32")
    return requested


def flash_attn_usable(device: torch.device, dtype: str) -> str | None:
    """None if FlashAttention-2 can run here, else the reason it cannot."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed"
    if device.type != "cuda":
        return "FlashAttention-2 needs a CUDA GPU"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "FlashAttention-2 needs an Ampere or newer GPU"
    if dtype not in ("bf16", "fp16"):
        return "FlashAttention-2 needs bf16 or fp16"
    return None


def resolve_attention(requested: str, device: torch.device, dtype: str) -> str:
    if requested == "auto":
        return "flash_attention_2" if flash_attn_usable(device, dtype) is None else "sdpa"
    if requested == "flash_attention_2":
        reason = flash_attn_usable(device, dtype)
        if reason:
            raise HarnessError(f"--attn flash_attention_2: {reason}; use --attn sdpa")
    return requested


def load_tokenizer(path: str, trust_remote_code: bool):
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HarnessError(f"--model {path}: cannot load its tokenizer: {err}") from None


def load_model(path: str, dtype: str, attn: str, grad_ckpt: bool, trust_remote_code: bool):
    """Load for training. Call inside `engine.Zero3LoadContext` so ZeRO-3 shards at load time.

    Every weight of the model must come from the folder and every tensor of the folder must be
    used: transformers would otherwise initialise the missing ones at random (and drop the
    unexpected ones) with only a log line, and the run would fine-tune a partly random model.
    """
    model, report = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        use_safetensors=True,
        output_loading_info=True,
    )
    check_load_report(path, report)
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if grad_ckpt:
        # Non-reentrant checkpointing works with ZeRO-3's parameter hooks and with inputs that
        # do not require grad; the reentrant variant silently drops gradients in those cases.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # from_pretrained returns eval mode, which also disables checkpointing
    return model


def check_weights_match(path: str, trust_remote_code: bool) -> None:
    """The load report of a dry run on the meta device (headers only, no weight is read): every
    weight the model needs is in the folder and every tensor in the folder is used. Before any
    expensive work; the real load checks its own report again (`load_model`), which under ZeRO-3
    lists missing weights but, in transformers 5.x, not unexpected ones."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # our error names the weights; its table would repeat them on every rank
    transformers_logging.disable_progress_bar()  # nothing is loaded: a "Loading weights" bar would mislead
    try:
        _, report = AutoModelForCausalLM.from_pretrained(path, device_map="meta", trust_remote_code=trust_remote_code,
                                                         local_files_only=True, use_safetensors=True,
                                                         output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise HarnessError(f"--model {path}: cannot be loaded as a causal LM: {str(err).splitlines()[0]}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
    check_load_report(path, report)


def check_load_report(path: str, report: dict) -> None:
    """Refuse a load that left weights missing, unused or of the wrong shape (transformers' report)."""
    problems = []
    for key, what in (("missing_keys", "missing from the folder (they would start random)"),
                      ("unexpected_keys", "in the folder but not in the model"),
                      ("mismatched_keys", "of another shape than the model's")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in report.get(key) or ())
        if names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems.append(f"{len(names)} weight(s) {what}: {shown}")
    if report.get("error_msgs"):
        problems.append("; ".join(str(m) for m in report["error_msgs"][:3]))
    if problems:
        raise HarnessError(f"--model {path}: the weights do not match the model's architecture:\n  " + "\n  ".join(problems))


def count_parameters(path: str) -> int:
    """Parameters in a model folder, read from the safetensors headers only (no weights loaded)."""
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total

# --- LoRA (peft) -------------------------------------------------------------------------------


def lora_targets(value: str) -> str | list[str]:
    return "all-linear" if value.strip() == "all-linear" else [t.strip() for t in value.split(",") if t.strip()]


def lora_parameters(config, value: str, r: int, trust_remote_code: bool) -> int:
    """The adapter parameters --lora will train, counted on a weightless (meta) model; every
    --lora_targets name must match a Linear module.

    An adapter on a Linear(in, out) is A (r x in) plus B (out x r); all-linear, like peft, skips
    the output head.
    """
    targets = lora_targets(value)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linears = {name: m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    if targets == "all-linear":
        head = skeleton.get_output_embeddings()
        chosen = [m for m in linears.values() if m is not head]
    else:
        names = {name.rsplit(".", 1)[-1] for name in linears}
        missing = [t for t in targets if t not in names]
        if missing or not targets:
            raise HarnessError(f"--lora_targets {value!r}: no Linear module named {missing or value!r} in the model "
                               f"(Linear modules: {', '.join(sorted(names))})")
        chosen = [m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets]
    return sum(r * (m.in_features + m.out_features) for m in chosen)


def apply_lora(model, cfg):
    """Wrap the model in peft LoRA adapters; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model  # seconds to import; only --lora needs it

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=lora_targets(cfg.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_base(path: str) -> str | None:
    """The base model folder of a peft adapter folder, or None if `path` is not one."""
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise HarnessError(f"--model {path}: adapter_config.json names no base_model_name_or_path")
    return base


def merge_adapter(base_path: str, adapter_dir, dtype: str, trust_remote_code: bool):
    """The base model with the adapter folded into its weights, as a plain transformers model (CPU)."""
    from peft import PeftModel  # seconds to import; only adapter folders need it
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                local_files_only=True, use_safetensors=True)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
