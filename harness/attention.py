"""Attention for packed rows: one entry point, registered with transformers, exact on every kernel.

A packed micro-batch reaches the model as ONE flattened row (batch 1, no padding) holding several
samples back to back, with the samples' boundaries computed once on the host (harness.packing):

    cu_seq_lens_q/k   int32 [0, len_0, len_0 + len_1, ...]   (on the device)
    max_length_q/k    the longest sample (a Python int; the kernels' launch grids need it on the host)
    packed_seq_lens   the samples' lengths as a tuple of ints (the host-side reference kernel's split)

`varlen_attention_forward` is registered with transformers' `AttentionInterface` under `NAME`, a
name without "flash", "sdpa", "flex" or "/" (transformers gives those names special handling:
FlashAttention import checks, SDPA dispatch, hub kernels). For an unknown name transformers
builds no attention mask at all, so no per-forward boundary detection from position ids (a device
sync) and no seq x seq mask ever happen; the boundaries above are the only ones used. Each call
runs, first usable wins:

    flash_attn_varlen   flash_attn.flash_attn_varlen_func (flash-attn 2 installed; CUDA sm80+, bf16/fp16)
    torch_varlen_attn   torch.nn.attention.varlen.varlen_attn (torch >= 2.10, no extra package;
                        PyTorch's bundled FlashAttention-2; CUDA sm80+, bf16/fp16)
    sdpa_per_sample     scaled_dot_product_attention on each sample alone, causal, split at the
                        host-known lengths: the exact reference for the CPU, fp32, or a GPU
                        without either kernel. Work is sum of s_i^2, never (sum s_i)^2.

All three compute each sample's causal attention over that sample only. The choice depends only on
the device, the dtype and what is installed (`kernel_for`), never on an exception from a call;
`config.json` records it (resolved.attn_kernel) and `kernels_run` counts what actually ran.

The model keeps the attention implementation it was loaded with (sdpa, eager, flash_attention_2)
for everything that is not a packed row: padded batches, evaluation, generation with its KV cache
and left padding. `Engine` switches the model to `NAME` for a packed forward and back for any
other (`use_packed`); the switch is left in place until the next forward, so activation
checkpointing recomputes a packed layer in backward with the same function.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from harness.errors import HarnessError

NAME = "harness_varlen"
KERNELS = ("flash_attn_varlen", "torch_varlen_attn", "sdpa_per_sample")

kernels_run: collections.Counter = collections.Counter()  # kernel -> calls (one per layer per forward)


@functools.cache
def _flash_attn_varlen():
    """flash_attn_varlen_func when flash-attn 2 imports, else None (resolved once)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except ImportError:  # installed but built against another torch/CUDA: not usable here
        return None


@functools.cache
def _torch_varlen():
    """(varlen_attn, causal kwargs, takes enable_gqa) for this torch, or None before 2.10.

    The signature moved between releases: 2.10 took `is_causal`; 2.11 has only `window_size`,
    causal being (-1, 0) (compared as a tuple); 2.13 adds `enable_gqa` and refuses H != H_kv
    without it. Read once from the signature rather than per call.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn  # new in torch 2.10: older ones have none
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


@functools.cache
def _kernel_for(device_type: str, device_index: int | None, dtype: torch.dtype) -> str:
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        index = device_index if device_index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) >= (8, 0):
            if _flash_attn_varlen() is not None:
                return "flash_attn_varlen"
            if _torch_varlen() is not None:
                return "torch_varlen_attn"
    return "sdpa_per_sample"


def kernel_for(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel packed rows run on for activations of `dtype` on `device` (see module docstring)."""
    return _kernel_for(device.type, device.index, dtype)


def check_model(config, seq_len: int) -> None:
    """Packed rows need plain causal attention per sample: refuse what the kernels above do not do."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < seq_len:
        raise HarnessError(f"--packing: the model attends through a sliding window of {window} tokens, shorter than "
                           f"--seq_len {seq_len}; packed attention does not implement it. Use --seq_len {window} "
                           f"or --packing False")
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, name, None):
            raise HarnessError(f"--packing: the model caps attention logits ({name}); packed attention does not "
                               f"implement it. Use --packing False")


def use_packed(model: torch.nn.Module, packed: bool, base: str) -> None:
    """Point the model's attention at NAME for a packed forward, at `base` for any other."""
    config = model.config
    want = NAME if packed else base
    if config._attn_implementation != want:
        config._attn_implementation = want


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None,
                             packed_seq_lens: tuple[int, ...] | None = None, **kwargs):
    """transformers' attention signature: query (1, H, T, D), key/value (1, H_kv, T, D) after RoPE;
    returns ((1, T, H, D), None)."""
    batch, heads, tokens, head_dim = query.shape
    if cu_seq_lens_q is None or batch != 1 or attention_mask is not None:
        raise ValueError(f"{NAME} attends within packed rows only: one flattened row with cu_seq_lens_q/k and no "
                         f"attention mask (got batch {batch}, cu_seq_lens_q {'set' if cu_seq_lens_q is not None else 'missing'}, "
                         f"mask {'set' if attention_mask is not None else 'none'})")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME}: the model asks for {name}={kwargs[name]!r}, which packed attention does not implement")
    kernel = kernel_for(query.device, query.dtype)
    kernels_run[kernel] += 1
    if kernel == "sdpa_per_sample":
        return _sdpa_per_sample(query, key, value, dropout, scaling, cu_seq_lens_q, packed_seq_lens), None

    q = query.transpose(1, 2).reshape(tokens, heads, head_dim)
    k = key.transpose(1, 2).reshape(tokens, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(tokens, value.shape[1], head_dim)
    if kernel == "flash_attn_varlen":
        out = _flash_attn_varlen()(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                                   dropout_p=dropout, softmax_scale=scaling, causal=True)
    else:
        if dropout:
            raise ValueError(f"{NAME}: torch's varlen_attn has no attention dropout (the model asks for {dropout})")
        varlen_attn, causal, takes_gqa = _torch_varlen()
        # Grouped-query attention is native to the kernel (H % H_kv == 0); only torch >= 2.13 wants it said.
        gqa = {"enable_gqa": True} if takes_gqa and k.shape[1] != heads else {}
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling,
                          **causal, **gqa)
    return out.view(1, tokens, heads, head_dim), None


def _sdpa_per_sample(query, key, value, dropout, scaling, cu_seq_lens, lengths):
    if lengths is None:
        # The harness always passes the lengths from the host; a caller that did not pays one read.
        lengths = tuple(cu_seq_lens.diff().tolist())
    gqa = key.shape[1] != query.shape[1]
    parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
             for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2)


AttentionInterface.register(NAME, varlen_attention_forward)
