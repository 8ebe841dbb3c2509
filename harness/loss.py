"""The training loss, defined once.

The loss of an optimizer step is the sum of per-token cross-entropies over every supervised
token of every micro-batch on every rank, divided by the number of those tokens. A mean of
per-micro-batch means would weight a short row's tokens more than a long row's and would change
with micro-batch size, grad-accum steps and world size; this does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.labels import IGNORE_INDEX


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """16-bit logits go up to fp32 for the loss; fp64 (tests checking identities exactly) stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over supervised positions, in fp32."""
    vocab = logits.shape[-1]
    shifted_logits = at_least_fp32(logits[:, :-1, :]).reshape(-1, vocab)
    shifted_labels = labels[:, 1:].reshape(-1).to(shifted_logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                           chunk_tokens: int) -> torch.Tensor:
    """token_loss_sum(lm_head(hidden), labels), from the final hidden states, in chunks.

    The plain path holds the logits of every position, their fp32 copy and its gradient:
    rows x seq_len x vocab x ~10 bytes, the largest activation of a large-vocabulary model.
    Here logits exist only for `chunk_tokens` supervised positions at a time (prompt and padding
    positions never reach the head), and each chunk is recomputed in backward instead of kept.
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, y.numel(), chunk_tokens):
        total = total + checkpoint(_chunk_loss_sum, h[i:i + chunk_tokens], y[i:i + chunk_tokens], lm_head,
                                   use_reentrant=False)
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
