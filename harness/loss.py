"""The training loss, defined once.

The loss of an optimizer step is the sum of per-token cross-entropies over every supervised
token of every micro-batch on every rank, divided by the number of those tokens. A mean of
per-micro-batch means would weight a short row's tokens more than a long row's and would change
with micro-batch size, grad-accum steps and world size; this does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.data import IGNORE_INDEX


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over supervised positions, in fp32."""
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].float().reshape(-1, vocab)
    shifted_labels = labels[:, 1:].reshape(-1).to(shifted_logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of next-token log-probabilities over supervised positions, in fp32.

    The same shift and mask as the loss: row i's value is minus its own token_loss_sum.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    per_token = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX,
                                reduction="none")
    return -per_token.sum(dim=1)
