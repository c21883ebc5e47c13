import torch
import torch.nn.functional as F

from dyndepth.train.loss import lm_loss


def test_lm_loss_matches_cross_entropy_with_ignore():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


def test_lm_loss_is_fp32_for_bf16_logits_and_sum_reduction():
    logits = torch.randn(1, 4, 7).bfloat16()
    labels = torch.tensor([[1, 2, -100, 3]])
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(lm_loss(logits, labels, reduction="sum"), loss * 3)


def test_lm_loss_all_ignored_is_zero_and_shape_error():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    assert lm_loss(logits, torch.full((1, 3), -100)).item() == 0.0
    try:
        lm_loss(logits, torch.zeros(1, 4, dtype=torch.long))
    except ValueError as e:
        assert "do not align" in str(e)
    else:
        raise AssertionError("expected a ValueError")
