"""Every DeepSpeed call the harness makes lives in this module.

The training loop sees an `Engine` with a few verbs: `forward_backward` (one micro-batch),
`optimizer_step` (the update at the accumulation boundary, or DeepSpeed's skip of it),
`save_state` / `load_state` (checkpoints), `full_state_dict` (final/ and best/) and `lr`.
Evaluation adds `eval_loss_sum`, `sequence_log_likelihood` (label scoring) and `generate`;
`Engine(model, ds_config)` without an LR schedule is an inference engine (no optimizer), used
by launch/evaluate.py. Module-level functions cover the rest: process-group start
(`init_distributed`), ZeRO-3 load-time sharding (`Zero3LoadContext`), checkpoint conversion
(`consolidate_checkpoint`, `lazy_checkpoint_tensors`) and the memory planner's estimators
(`zero_model_states_bytes`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # DeepSpeed would pick the CPU accelerator anyway, but warns about it on every rank.
    os.environ["DS_ACCELERATOR"] = "cpu"

# The imports below must follow the accelerator choice above.
import datasets  # noqa: E402
import deepspeed  # noqa: E402
import transformers  # noqa: E402
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: E402
from deepspeed.utils.zero_to_fp32 import (convert_zero_checkpoint_to_state_dict,  # noqa: E402
                                          get_fp32_state_dict_from_zero_checkpoint)
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from harness import dist  # noqa: E402
from harness.loss import chunked_token_loss_sum, sequence_log_likelihood, token_loss_sum  # noqa: E402
from harness.throughput import NULL_TIMER  # noqa: E402


def init_distributed(timeout_s: int = 1800) -> dist.DistInfo:
    dist.ensure_launcher_env()
    quiet_libraries()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timedelta(seconds=timeout_s))
    return dist.info()


class Zero3LoadContext:
    """Under ZeRO-3, `from_pretrained` must see the DeepSpeed config so it builds the model
    inside `deepspeed.zero.Init` and each rank only ever holds its shard of the weights.
    transformers finds the config through a global weak reference, so we keep it alive here
    until the engine exists."""

    def __init__(self, ds_config: dict):
        self._hf_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None

    def release(self) -> None:
        self._hf_config = None


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for a padded or a packed batch (tests call the same)."""
    if "position_ids" in batch:
        # Packed rows (harness.packing): the position ids alone delimit the samples; a 2D
        # mask, or a KV cache, would make transformers attend across them.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


class Engine:
    def __init__(self, model: torch.nn.Module, ds_config: dict, lr_lambda=None, chunked_ce: int = 0):
        self.chunked_ce = chunked_ce
        if lr_lambda is None:
            # Inference: no optimizer; under ZeRO-3 the engine still partitions the weights and
            # gathers each layer for its forward, which is what lets a large model be evaluated.
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(model=model, config=ds_config)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=params,
                config=ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            )
        self.world_size = self.ds.world_size
        self.zero_stage = self.ds.zero_optimization_stage()

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def train(self) -> None:
        self.ds.train()

    def forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.ds.device) for k, v in batch.items()}
        if self.chunked_ce:
            # logits_to_keep=1: the model's own head runs on one position only; the loss applies
            # the same head (DeepSpeed's hooks gather it under ZeRO-3) chunk by chunk.
            out = self.ds(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
            return chunked_token_loss_sum(out.hidden_states[-1], self.ds.module.get_output_embeddings(),
                                          batch["labels"], self.chunked_ce)
        logits = self.ds(**model_inputs(batch)).logits
        return token_loss_sum(logits, batch["labels"])

    def forward_backward(self, batch: dict[str, torch.Tensor], step_tokens: float, timer=NULL_TIMER) -> torch.Tensor:
        """Forward and backward one micro-batch; return its (unnormalised) loss sum, detached.

        DeepSpeed averages gradients over ranks; we do not let it divide by the accumulation
        steps (scale_wrt_gas=False) and instead scale each micro-batch's loss sum by
        world_size / step_tokens, where step_tokens counts the supervised tokens of the whole
        optimizer step on all ranks. The accumulated gradient is then exactly the gradient of
        the token-weighted step loss.

        `timer` (harness.throughput.StepTimer) brackets forward and backward.
        """
        t = timer.start("forward")
        loss_sum = self.forward_loss_sum(batch)
        timer.stop(t)
        t = timer.start("backward")
        self.ds.backward(loss_sum * (self.world_size / step_tokens), scale_wrt_gas=False)
        timer.stop(t)
        if not self.ds.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-steps in step(): before the boundary it only advances that count.
            self.ds.step()
        return loss_sum.detach()

    def optimizer_step(self, timer=NULL_TIMER) -> bool:
        """The update at the accumulation boundary (after the last forward_backward of a step).

        Returns False when DeepSpeed skipped it because the gradient norm was not finite: its
        ZeRO optimizers check the global norm (reduced over ranks) and then zero the gradients and
        leave weights, optimizer state and LR schedule untouched, on every rank alike. We read that
        decision rather than re-deriving the norm from ZeRO's partitioned gradient buffers. The
        timed phase includes ZeRO's gradient reduction and any offloaded update.
        """
        skipped_before = self.ds.skipped_steps
        t = timer.start("optimizer")
        self.ds.step()
        timer.stop(t)
        return self.ds.skipped_steps == skipped_before

    def save_state(self, folder: Path) -> None:
        """Every rank writes its shard of weights, optimizer and LR-schedule state."""
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load_state(self, folder: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    @staticmethod
    def convert_to_universal(ds_folder: Path, out: Path) -> None:
        """DeepSpeed's universal checkpoint: state re-sliced per parameter, loadable on any world size."""
        # ds_to_universal is a script with its own worker pools; run it as DeepSpeed documents it.
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_folder),
                        "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
                        "--inject_missing_state"], check=True, capture_output=True, text=True)

    def last_grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self.forward_loss_sum(batch))

    def eval(self) -> None:
        self.ds.eval()

    @torch.no_grad()
    def sequence_log_likelihood(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: the summed log-probability of its supervised tokens (label scoring), on the CPU."""
        batch = {k: v.to(self.ds.device) for k, v in batch.items()}
        logits = self.ds(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sequence_log_likelihood(logits, batch["labels"]).cpu()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_id: int, eos_id: int) -> torch.Tensor:
        """Greedy decoding of a left-padded batch with the KV cache; returns only the new tokens.

        Under ZeRO-3 every forward gathers each layer's shards from all ranks, so a rank whose
        rows have all stopped must keep stepping until every rank is done: synced_gpus.
        """
        synced = self.zero_stage == 3 and self.world_size > 1
        out = self.ds.module.generate(
            input_ids=input_ids.to(self.ds.device), attention_mask=attention_mask.to(self.ds.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            synced_gpus=synced, pad_token_id=pad_id, eos_token_id=eos_id,
        )
        return out[:, input_ids.shape[1]:].cpu()

    def non_finite_weights(self) -> list[str]:
        """Names of the weights that hold a NaN or Inf on any rank (empty: all finite); all ranks
        must call it. Each rank checks what it holds (under ZeRO-3 its partition, `ds_tensor`):
        one pass over the weights, one host sync and one collective; names are gathered only
        when something is wrong."""
        named = [(n, getattr(p, "ds_tensor", p)) for n, p in self.ds.module.named_parameters()]
        named = [(n, t) for n, t in named if t.numel()]
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, t in named:
            per_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        # One host sync per device the weights live on (two at most: the GPU and, offloaded, the CPU).
        local_bad = sum(int((~torch.stack(flags)).sum()) for flags in per_device.values())
        if dist.all_reduce_sum([float(local_bad)])[0] == 0:
            return []
        mine = [n for n, t in named if not bool(torch.isfinite(t).all())]  # the failure path only
        return sorted({n for names in dist.all_gather_objects(mine) for n in names})

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The complete model weights on rank 0 (None elsewhere); all ranks must call it.

        ZeRO-3 weights are gathered one layer at a time onto rank 0's CPU memory, never the
        whole model on one device.
        """
        if self.zero_stage == 3:
            return self.ds._zero3_consolidated_16bit_state_dict()
        if self.ds.global_rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.ds.module.state_dict().items()}


def consolidate_checkpoint(ds_folder: Path, out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """Write a DeepSpeed checkpoint's full weights as sharded safetensors, in one process.

    DeepSpeed's converter reads the per-rank shards memory-mapped and materialises one output
    shard at a time, so memory stays near one shard beyond what the OS pages in.
    """
    convert_zero_checkpoint_to_state_dict(str(ds_folder.parent), str(out), dtype=dtype, max_shard_size=max_shard_size,
                                          safe_serialization=True, tag=ds_folder.name)


def lazy_checkpoint_tensors(ds_folder: Path) -> dict:
    """Name -> lazily materialised fp32 tensor (call .contiguous()) of a DeepSpeed checkpoint."""
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_folder.parent), tag=ds_folder.name, lazy_mode=True)


def zero_model_states_bytes(stage: int, offload: bool, total_params: int, largest_layer_params: int,
                            gpus_per_node: int, nodes: int, additional_buffer_factor: float) -> tuple[int, int]:
    """(host bytes, GPU bytes) of ZeRO-2 or ZeRO-3 model states per DeepSpeed's own estimators
    (the functions behind its *_all_cold printers); offload moves optimizer state (and, under
    ZeRO-3, parameters) to the host."""
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, nodes, cpu_offload=offload,
                                                     additional_buffer_factor=additional_buffer_factor)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, gpus_per_node, nodes,
                                                        cpu_offload=offload, cpu_offload_params=offload, zero_init=True,
                                                        additional_buffer_factor=additional_buffer_factor)
    return cpu, gpu


def quiet_libraries() -> None:
    """Per-file progress bars from datasets/transformers drown the harness's own progress bar."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
