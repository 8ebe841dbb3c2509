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

import contextlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import threading
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
from deepspeed.checkpoint import ds_to_universal  # noqa: E402
from deepspeed.comm.torch import build_shm_op  # noqa: E402
from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict, get_fp32_state_dict_from_zero_checkpoint  # noqa: E402
from torch.utils.cpp_extension import get_default_build_root  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from harness import attention, dist  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.loss import (chunked_token_loss_sum, loss_index, selected_token_loss_sum,  # noqa: E402
                          sequence_log_likelihood, token_loss_sum)
from harness.throughput import NULL_TIMER  # noqa: E402


def init_distributed(timeout_s: int = 1800) -> dist.DistInfo:
    dist.ensure_launcher_env()
    quiet_libraries()
    with ops_build_watchdog():  # on CPU this builds DeepSpeed's shared-memory comm op on first use
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
        with ops_build_watchdog():  # FusedAdam / DeepSpeedCPUAdam are compiled on first use
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
        with weights_only_loading(folder):
            path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    @staticmethod
    def convert_to_universal(ds_folder: Path, out: Path) -> None:
        """DeepSpeed's universal checkpoint: state re-sliced per parameter, loadable on any world size."""
        # ds_to_universal is a script with its own worker pools: it runs in its own process, as
        # DeepSpeed documents it, but through universal_conversion_main so that it loads weights-only.
        # The harness may run from a checkout without being installed: the child must find it too.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        child = "from harness import engine; raise SystemExit(engine.universal_conversion_main())"  # the child's entry point
        proc = subprocess.run(
            [sys.executable, "-c", child, "--input_folder", str(ds_folder), "--output_folder", str(out),
             "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
            env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
        if proc.returncode == 2:  # our own error line (a refused file), not a crash
            raise HarnessError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ds_folder} to DeepSpeed's universal checkpoint failed:\n"
                               f"{proc.stderr[-4000:]}")

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
                 pad_id: int, eos_id: int | list[int]) -> torch.Tensor:
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
    with weights_only_loading(ds_folder):
        convert_zero_checkpoint_to_state_dict(str(ds_folder.parent), str(out), dtype=dtype,
                                              max_shard_size=max_shard_size, safe_serialization=True,
                                              tag=ds_folder.name)


def lazy_checkpoint_tensors(ds_folder: Path) -> dict:
    """Name -> lazily materialised fp32 tensor (call .contiguous()) of a DeepSpeed checkpoint."""
    with weights_only_loading(ds_folder):  # lazy tensors are memory-mapped: all unpickling happens here
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


# -- DeepSpeed's compiled ops -----------------------------------------------------------------------
# DeepSpeed JIT-compiles its C++ ops on first use (torch.utils.cpp_extension), each build holding
# `<extensions folder>/<op>/lock`. A build that is killed leaves that lock behind, and every later
# run then waits on it forever without a word (torch's FileBaton.wait). scripts/setup.sh builds
# the ops once (build_ops); the watchdog names a lock that still holds a run up.
OPS_BUILD_WARN_AFTER_S = 30.0


def build_ops() -> None:
    """Compile the ops a run would otherwise compile on first use, the way DeepSpeed loads them."""

    build_shm_op()  # the CPU accelerator's shared-memory all-reduce, built inside every init_distributed
    optional = [(CPUAdamBuilder, "an *_offload config (DeepSpeedCPUAdam)")]
    if torch.cuda.is_available():
        optional.append((FusedAdamBuilder, "the zero2/zero3 configs on GPUs (FusedAdam)"))
    for builder, used_by in optional:
        try:
            builder().load()
        except Exception as err:  # report and go on: setup must not fail for what only some runs use
            print(f"warning: could not build the op for {used_by}: {err}; such runs will try again at their "
                  f"start", file=sys.stderr)


def extension_build_locks() -> list[Path]:
    """Lock files of op builds in progress, or left by builds that were killed."""

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    # Default layout: <cache>/torch_extensions/py311_cpu/<op>/lock; TORCH_EXTENSIONS_DIR/<op>/lock.
    return sorted(Path(root).glob("*/lock")) if root else sorted(Path(get_default_build_root()).glob("*/*/lock"))


def lock_holders(lock: Path) -> list[int]:
    """Processes on this machine with the lock file open: the build that created it keeps it open."""
    holders, target = [], os.path.realpath(lock)
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == target:
                holders.append(int(fd.parts[2]))
        except OSError:
            continue  # another user's process, or one that just ended
    return sorted(set(holders))


@contextlib.contextmanager
def ops_build_watchdog():
    """Warn once, from each node's first rank, if the block still runs after OPS_BUILD_WARN_AFTER_S
    while an op build lock exists, naming the lock and how to clear it."""
    done, after_s = threading.Event(), OPS_BUILD_WARN_AFTER_S

    def watch():
        if done.wait(after_s):
            return
        for lock in extension_build_locks():
            holders = lock_holders(lock)
            state = (f"held by process {', '.join(map(str, holders))} on this machine: a build is running, let it "
                     f"finish" if holders else
                     f"held by no process on this machine: unless a build runs on another machine sharing this "
                     f"folder, a killed build left it behind; delete it (rm {lock}) and the run goes on")
            print(f"warning: DeepSpeed has waited {after_s:.0f} s for a compiled op; build lock {lock} is {state}. "
                  f"(`bash scripts/setup.sh` builds the ops ahead of any run.)", file=sys.stderr, flush=True)

    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the ranks of a node wait on the same lock
        threading.Thread(target=watch, name="ops-build-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


# -- safe loading -----------------------------------------------------------------------------------
# DeepSpeed reads its checkpoint files with torch.load(weights_only=False): unpickling a crafted
# file runs whatever code it names. Inside weights_only_loading every torch.load is weights-only
# (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides the argument DeepSpeed passes), with exactly the
# non-tensor classes DeepSpeed's own ZeRO-2/3 state holds allowed besides torch's defaults.

def deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into ZeRO-2/3 optimizer-state files (the GLOBAL opcodes of
    every .pt file it writes, bf16/fp32, offload, LoRA and universal included; model-state files
    hold only dicts, lists, OrderedDict and tensors, all allowed by default)."""
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading(folder: Path):
    """Every torch.load inside is weights-only; a file that needs more is refused, by name."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_classes()):
            yield
    except pickle.UnpicklingError as err:
        # torch raises this from inside torch.load, whose frame still holds the file it was reading.
        tb, path = err.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code is torch.serialization.load.__code__:
                path = tb.tb_frame.f_locals.get("f")
            tb = tb.tb_next
        found = re.search(r"GLOBAL (\S+)", str(err))
        last_line = str(err).strip().splitlines()[-1]
        needs = found.group(1) if found else f"what weights-only loading refuses ({last_line})"
        why = (f"this DeepSpeed version stores {needs} in its state: if that class is data, add it to "
               f"engine.deepspeed_state_classes" if needs.startswith("deepspeed.") else
               "a checkpoint this harness wrote never does: the file was altered or comes from elsewhere, "
               "and loading it could run code")
        raise HarnessError(f"refusing to load {path or f'a file in {folder}'}: unpickling it needs {needs}, which is "
                           f"neither a tensor nor DeepSpeed's checkpoint state; {why}") from None
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def universal_conversion_main() -> int:
    """`python -m deepspeed.checkpoint.ds_to_universal ARGS` with weights-only loading: the child
    process of Engine.convert_to_universal. 2, with an `error:` line, when a file is refused."""

    args = ds_to_universal.parse_arguments()  # from sys.argv, as the script does
    try:
        with weights_only_loading(Path(args.input_folder)):
            ds_to_universal.main(args)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
