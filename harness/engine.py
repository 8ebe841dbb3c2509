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

import inspect
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

from harness import attention, dist  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.loss import (chunked_token_loss_sum, loss_index, selected_token_loss_sum,  # noqa: E402
                          sequence_log_likelihood, token_loss_sum)
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


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a padded or a packed batch (tests call the same)."""
    if "cu_seq_lens" in batch:
        # One flattened packed row (harness.packing): the boundaries computed on the host go
        # straight to harness.attention's kernels; no mask, no KV cache.
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
                "packed_seq_lens": batch["seq_lens"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device without waiting for the copy (pinned host memory makes it truly
    asynchronous on a GPU); host values (lengths) stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Engine:
    def __init__(self, model: torch.nn.Module, ds_config: dict, lr_lambda=None, chunked_ce: int = 0,
                 ce_chunks: int = 0):
        # --chunked_ce: training forwards split their targets into `ce_chunks` chunks, a fixed
        # count (harness.loss.chunked_token_loss_sum says why); evaluation into chunks of chunked_ce.
        self.chunked_ce, self.ce_chunks = chunked_ce, ce_chunks
        # The kernel the model was loaded with serves every batch that is not a packed row.
        self.base_attn = model.config._attn_implementation
        # transformers' causal LMs take `logits_to_keep` (an int, or the positions to keep).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.packed_checked = False
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

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def train(self) -> None:
        self.ds.train()

    def forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """The micro-batch's loss sum, left on the device."""
        packed = "cu_seq_lens" in batch
        attention.use_packed(self.ds.module, packed, self.base_attn)
        if self.chunked_ce and "loss_index" not in batch:
            batch = {**batch, "loss_index": loss_index(batch["labels"])}  # evaluation batches: host tensors
        batch = to_device(batch, self.ds.device)
        calls = sum(attention.kernels_run.values())
        if self.chunked_ce:
            # logits_to_keep=1: the model's own head runs on one position only; the loss applies
            # the same head (DeepSpeed's hooks gather it under ZeRO-3) chunk by chunk.
            out = self.ds(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
            loss_sum = chunked_token_loss_sum(out.hidden_states[-1], self.ds.module.get_output_embeddings(),
                                              batch["labels"], self.chunked_ce, batch["loss_index"],
                                              self.ce_chunks if torch.is_grad_enabled() else 0)
        elif packed and self.keeps_logits:
            # One flat row: the model's head runs only on the positions whose next token is a
            # target (host-known), so prompt positions cost no head FLOPs and hold no logits.
            logits = self.ds(**model_inputs(batch), logits_to_keep=batch["loss_index"]).logits
            loss_sum = selected_token_loss_sum(logits, batch["labels"], batch["loss_index"])
        else:
            loss_sum = token_loss_sum(self.ds(**model_inputs(batch)).logits, batch["labels"])
        if packed and not self.packed_checked:
            self.check_packed_attention(calls)
        return loss_sum

    def check_packed_attention(self, calls_before: int) -> None:
        """A model whose attention does not go through transformers' AttentionInterface would
        ignore the packed boundaries and attend across samples: stop at its first packed forward."""
        if sum(attention.kernels_run.values()) == calls_before:
            raise HarnessError(f"--packing: {type(self.ds.module).__name__} does not route attention through "
                               f"transformers' AttentionInterface, so packed samples would attend to each other; "
                               f"use --packing False")
        self.packed_checked = True

    def forward_backward(self, batch: dict, step_tokens: int, timer=NULL_TIMER) -> torch.Tensor:
        """Forward and backward one micro-batch; return its (unnormalised) loss sum, detached, on the device.

        DeepSpeed averages gradients over ranks; we do not let it divide by the accumulation
        steps (scale_wrt_gas=False) and instead scale each micro-batch's loss sum by
        world_size / step_tokens, where step_tokens counts the supervised tokens of the whole
        optimizer step on all ranks (known on the host from the data). The accumulated gradient
        is then exactly the gradient of the token-weighted step loss.

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

    def last_grad_norm(self) -> torch.Tensor | float | None:
        """The last step's global gradient norm as DeepSpeed keeps it: a device tensor (ZeRO-2/3 on a
        GPU), a float, or None; the loop reads it together with the loss (one read)."""
        return self.ds.get_global_grad_norm()

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
        attention.use_packed(self.ds.module, False, self.base_attn)
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
        attention.use_packed(self.ds.module, False, self.base_attn)
        out = self.ds.module.generate(
            input_ids=input_ids.to(self.ds.device), attention_mask=attention_mask.to(self.ds.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            synced_gpus=synced, pad_token_id=pad_id, eos_token_id=eos_id,
        )
        return out[:, input_ids.shape[1]:].cpu()

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
