"""Memory planner: which ZeRO stage and offload choice fits a model on given hardware.

    python launch/plan.py --model /models/llama-2-7b --world_size 1 --gpu_gib 80 --host_gib 128
    python launch/plan.py --model_config '{"hidden_size": 4096, "num_hidden_layers": 32, ...}'
    python launch/train.py --ds_config auto ...        # trains with the recommendation

Its flags (`harness.config.PlanConfig`) are training's where they mean the same: --micro_batch_size,
--seq_len (0: min(2048, the model's maximum), as in training), --grad_ckpt, --trust_remote_code.

The model is built on the meta device (shapes only, no weights), so planning a 70B model
costs nothing. Per choice we report:

  model states  DeepSpeed's own estimators (estimate_zero2_model_states_mem_needs and
                estimate_zero3_model_states_mem_needs, the functions behind the *_all_cold
                printers, called in harness.engine), with additional_buffer_factor=1.0: the bytes the states
                occupy (16-bit weights 2 N, fp32 weights + Adam moments 12 N, gradients 2-4 N).
                DeepSpeed's default factor 1.5 on host memory is shown as a cautious column.
  activations   per GPU, micro_batch_size x seq_len tokens through L layers of width h:
                  without --grad_ckpt: 34 x tokens x h x L bytes (Korthikanti et al. 2022,
                    "Reducing Activation Recomputation", 16-bit activations, attention scores
                    not stored: SDPA and FlashAttention keep no s x s matrix)
                  with --grad_ckpt: 2 x tokens x h x L (each layer's 16-bit input) plus one
                    layer's 34 x tokens x h being recomputed
                plus the logits: tokens x vocab x 10 bytes (16-bit logits, their fp32 copy in the
                loss, and its fp32 gradient).
  fits          GPU: states + activations <= 90% of GPU memory; host: states (per host) <= 90%
                of host memory. The 10% is for the CUDA context, allocator fragmentation, the OS
                and the data pipeline.

The recommendation is the first choice that fits in this order, fastest first: ZeRO-2 (one
all-reduce-sized exchange per step), ZeRO-3 (weights gathered every forward and backward),
ZeRO-2 + optimizer offload (the Adam step on the CPU), ZeRO-3 + optimizer and parameter
offload (weights streamed from host memory too). Each choice is a shipped ds_config.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harness import engine, model as model_mod
from harness.config import PlanConfig
from harness.errors import HarnessError

GiB = 2**30
HEADROOM = 0.9
CHOICES = ("zero2", "zero3", "zero2_offload", "zero3_offload")  # fastest first


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    largest_layer_params: int  # DeepSpeed's definition: the most parameters held directly by one module
    hidden_size: int
    n_layers: int
    vocab_size: int


@dataclass(frozen=True)
class Estimate:
    choice: str
    gpu_states: int
    activations: int
    host_states: int  # per host
    host_cautious: int  # DeepSpeed's default additional_buffer_factor 1.5
    fits_gpu: bool
    fits_host: bool

    @property
    def gpu_total(self) -> int:
        return self.gpu_states + self.activations

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


def load_config(model: str = "", model_config=None, trust_remote_code: bool = False):
    """An HF config from a model folder, a config.json path, or a dict of fields (llama if no model_type)."""
    if model:
        if not Path(model).exists():
            raise HarnessError(f"--model {model}: no such folder")
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    if isinstance(model_config, str) and Path(model_config).is_file():
        model_config = json.loads(Path(model_config).read_text())
    elif isinstance(model_config, str):
        try:
            model_config = json.loads(model_config)
        except json.JSONDecodeError:
            try:  # python-fire hands a JSON object over already parsed; the str() of that dict
                model_config = ast.literal_eval(model_config)
            except (ValueError, SyntaxError) as err:
                raise HarnessError(f"--model_config is neither a file nor a JSON object: {err}") from None
    if not isinstance(model_config, dict):
        raise HarnessError("give --model (a folder) or --model_config (a config.json path or a JSON object)")
    fields = dict(model_config)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def model_shape(config, trust_remote_code: bool = False) -> ModelShape:
    """Parameter counts of the model built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(total, largest, text.hidden_size, text.num_hidden_layers, text.vocab_size)


def activation_bytes(shape: ModelShape, micro_batch_size: int, seq_len: int, grad_ckpt: bool) -> int:
    tokens = micro_batch_size * seq_len
    layer = 34 * tokens * shape.hidden_size
    layers = 2 * tokens * shape.hidden_size * shape.n_layers + layer if grad_ckpt else layer * shape.n_layers
    return layers + 10 * tokens * shape.vocab_size


def estimate(shape: ModelShape, world_size: int, gpus_per_node: int, gpu_bytes: int, host_bytes: int,
             micro_batch_size: int, seq_len: int, grad_ckpt: bool) -> list[Estimate]:
    nodes = max(1, world_size // gpus_per_node)
    acts = activation_bytes(shape, micro_batch_size, seq_len, grad_ckpt)
    out = []
    for choice in CHOICES:
        offload = choice.endswith("offload")
        sizes = []
        for factor in (1.0, 1.5):
            sizes.append(engine.zero_model_states_bytes(2 if choice.startswith("zero2") else 3, offload, shape.total_params,
                                                        shape.largest_layer_params, gpus_per_node, nodes, factor))
        (cpu, gpu), (cautious, _) = sizes
        out.append(Estimate(choice, gpu, acts, cpu, cautious, gpu + acts <= HEADROOM * gpu_bytes,
                            cpu <= HEADROOM * host_bytes))
    return out


def recommend(estimates: list[Estimate]) -> Estimate | None:
    return next((e for e in estimates if e.fits), None)


def table(shape: ModelShape, estimates: list[Estimate], world_size: int, gpus_per_node: int, gpu_bytes: int,
          host_bytes: int) -> str:
    best = recommend(estimates)
    lines = [f"model: {shape.total_params / 1e6:,.1f}M parameters (largest layer {shape.largest_layer_params / 1e6:,.1f}M), "
             f"hidden {shape.hidden_size}, {shape.n_layers} layers, vocab {shape.vocab_size}",
             f"hardware: world size {world_size} ({gpus_per_node} per host), {gpu_bytes / GiB:.0f} GiB per GPU, "
             f"{host_bytes / GiB:.0f} GiB per host; fits = within {HEADROOM:.0%}",
             "| ds_config | GPU: states + activations | host per node | host, DeepSpeed x1.5 | fits |",
             "| --- | --- | --- | --- | --- |"]
    for e in estimates:
        fits = "yes" if e.fits else ("no: GPU" if not e.fits_gpu else "no: host")
        mark = " **recommended**" if e is best else ""
        lines.append(f"| {e.choice}{mark} | {size(e.gpu_states)} + {size(e.activations)} = {size(e.gpu_total)} | "
                     f"{size(e.host_states)} | {size(e.host_cautious)} | {fits} |")
    lines.append(f"recommendation: --ds_config {best.choice}" if best else
                 "recommendation: none fits; use more GPUs, --grad_ckpt, a smaller micro_batch_size or seq_len, or LoRA")
    return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int:
    """A GPU's total memory; on the CPU the 'device' is host memory shared by this host's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return host_memory_bytes() // ranks_here


def auto_ds_config(model_path: str, world_size: int, device, micro_batch_size: int, seq_len: int,
                   grad_ckpt: bool, trust_remote_code: bool) -> tuple[str, str]:
    """The shipped ds_config `--ds_config auto` resolves to on this machine, and the table that says why."""
    shape = model_shape(load_config(model_path, trust_remote_code=trust_remote_code), trust_remote_code)
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    gpu, host = device_memory_bytes(device), host_memory_bytes()
    estimates = estimate(shape, world_size, gpus_per_node, gpu, host, micro_batch_size, seq_len, grad_ckpt)
    best = recommend(estimates)
    text = table(shape, estimates, world_size, gpus_per_node, gpu, host)
    if best is None:
        raise HarnessError(f"--ds_config auto: no ZeRO stage and offload choice fits this model here\n{text}")
    return best.choice, text


def plan(cfg: PlanConfig) -> tuple[Estimate | None, str]:
    config = load_config(cfg.model, cfg.model_config, cfg.trust_remote_code)
    shape = model_shape(config, cfg.trust_remote_code)
    seq_len = model_mod.resolve_seq_len(cfg.seq_len, config)
    per_node = cfg.gpus_per_node or min(cfg.world_size, 8)
    gpu, host = int(cfg.gpu_gib * GiB), int(cfg.host_gib * GiB)
    estimates = estimate(shape, cfg.world_size, per_node, gpu, host, cfg.micro_batch_size, seq_len, cfg.grad_ckpt)
    return recommend(estimates), table(shape, estimates, cfg.world_size, per_node, gpu, host)
