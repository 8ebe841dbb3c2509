"""The training loss, defined once.

The loss of an optimizer step is the sum of per-token cross-entropies over every supervised
token of every micro-batch on every rank, divided by the number of those tokens. A mean of
per-micro-batch means would weight a short row's tokens more than a long row's and would change
with micro-batch size, grad-accum steps and world size; this does not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.labels import IGNORE_INDEX


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """16-bit logits go up to fp32 for the loss; fp64 (tests checking identities exactly) stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_index(labels: torch.Tensor) -> torch.Tensor:
    """Flattened positions t (over rows x (width - 1)) of a host (CPU) label tensor whose next token
    is a target: found with numpy on the host, so the chunked loss needs no nonzero on the device."""
    shifted = labels[:, 1:].numpy()
    return torch.from_numpy(np.flatnonzero(shifted.reshape(-1) != IGNORE_INDEX))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over supervised positions, in fp32."""
    vocab = logits.shape[-1]
    shifted_logits = at_least_fp32(logits[:, :-1, :]).reshape(-1, vocab)
    shifted_labels = labels[:, 1:].reshape(-1).to(shifted_logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def selected_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """token_loss_sum when the model computed logits only at `index` (harness.loss.loss_index's
    positions, in order): logits (1, n, vocab) of one row, n = index.numel()."""
    y = labels[:, 1:].reshape(-1).to(logits.device).index_select(0, index)
    return F.cross_entropy(at_least_fp32(logits.reshape(-1, logits.shape[-1])), y, reduction="sum")


def chunked_token_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                           chunk_tokens: int, index: torch.Tensor, chunks: int = 0) -> torch.Tensor:
    """token_loss_sum(lm_head(hidden), labels), from the final hidden states, in chunks.

    The plain path holds the logits of every position, their fp32 copy and its gradient:
    rows x seq_len x vocab x ~10 bytes, the largest activation of a large-vocabulary model.
    Here logits exist only for about `chunk_tokens` supervised positions at a time (prompt and
    padding positions never reach the head), and each chunk is recomputed in backward instead of kept.

    `index`: the flattened positions t (over rows x (width - 1)) whose next token is a target,
    computed on the host with the batch (harness.packing, harness.loss.loss_index). Its length is
    known without reading the device, so the chunks need no nonzero and no sync.

    `chunks` > 0 splits the targets into exactly that many chunks (of ceil(n / chunks) tokens,
    some possibly empty) whatever n is, so the head runs the same number of times in every
    forward: ZeRO-3 records the order in which modules run and prefetches (and keeps the head
    gathered between chunks) only while that order repeats. 0: chunks of `chunk_tokens`, at least one.
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1]).index_select(0, index)
    y = labels[:, 1:].reshape(-1).to(h.device).index_select(0, index)
    n = index.numel()
    size = max(1, -(-n // chunks)) if chunks else chunk_tokens
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    # Every chunk runs even when empty: a row without targets (a filler) still reaches the head,
    # so its loss is part of the graph and every parameter gets a (zero) gradient, as on the
    # plain path, and ZeRO's gradient hooks fire alike on every rank.
    for i in range(0, size * (chunks or max(1, -(-n // size))), size):
        total = total + checkpoint(_chunk_loss_sum, h[i:i + size], y[i:i + size], lm_head, use_reentrant=False)
    return total


def _chunk_loss_sum(h: torch.Tensor, y: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(lm_head(h)), y, reduction="sum")


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of next-token log-probabilities over supervised positions, in fp32.

    The same shift and mask as the loss: row i's value is minus its own token_loss_sum.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    per_token = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX,
                                reduction="none")
    return -per_token.sum(dim=1)
