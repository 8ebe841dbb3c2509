"""The loss normalisation and the LR schedule, each defined once and tested here."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness.config import TrainConfig
from harness.loss import supervised_tokens, token_loss_sum
from harness.schedule import lr_factor, lr_lambda, warmup_steps


def test_token_loss_sum_is_a_sum_over_supervised_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 2], [-100, 7, 2, -100, -100]])
    expected = 0.0
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                expected += F.cross_entropy(logits[b, t][None], labels[b, t + 1][None]).item()
    assert token_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert supervised_tokens(labels) == 5


def test_token_weighting_differs_from_mean_of_means():
    # Two micro-batches with 1 and 3 supervised tokens: the step loss weights all 4 tokens
    # equally, which a mean of the two batch means does not.
    torch.manual_seed(1)
    a_logits, b_logits = torch.randn(1, 3, 7), torch.randn(1, 5, 7)
    a_labels, b_labels = torch.tensor([[-100, -100, 1]]), torch.tensor([[-100, -100, 2, 3, 4]])
    sums = [token_loss_sum(a_logits, a_labels), token_loss_sum(b_logits, b_labels)]
    tokens = [supervised_tokens(a_labels), supervised_tokens(b_labels)]
    weighted = (sums[0] + sums[1]) / sum(tokens)
    mean_of_means = (sums[0] / tokens[0] + sums[1] / tokens[1]) / 2
    assert abs(weighted - mean_of_means) > 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay(schedule):
    total, warm = 20, 4
    f = [lr_factor(s, schedule=schedule, warmup=warm, total=total, min_ratio=0.1) for s in range(total)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(f[4:], f[5:]))
        assert f[-1] > 0.1 and lr_factor(total, schedule=schedule, warmup=warm, total=total, min_ratio=0.1) == pytest.approx(0.1)
    if schedule == "cosine":
        mid = lr_factor(12, schedule=schedule, warmup=warm, total=total, min_ratio=0.0)
        assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_warmup_means_full_lr_on_the_first_step():
    assert lr_lambda(TrainConfig(lr_schedule="constant"), 10)(0) == 1.0


def test_warmup_ratio():
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 50) == 5
    assert warmup_steps(TrainConfig(warmup_steps=7), 50) == 7
