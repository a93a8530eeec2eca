"""The reconstruction and classification losses as pure functions (CPU, tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from supmae.errors import UserError
from supmae.losses import classification_loss, normalize_patches, reconstruction_loss, supmae_loss
from supmae.models.supmae import SupMAEOutput


def _example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 8, 12, generator=g)
    target = torch.randn(3, 8, 12, generator=g)
    mask = torch.zeros(3, 8)
    mask[0, [1, 4]] = 1
    mask[1, [0, 2, 3, 7]] = 1
    mask[2, [5]] = 1
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_changing_visible_patches_leaves_loss_unchanged(norm_pix: bool) -> None:
    pred, target, mask = _example()
    base = reconstruction_loss(pred, target, mask, norm_pix)
    visible = mask == 0
    target2, pred2 = target.clone(), pred.clone()
    target2[visible] += 5.0 * torch.randn_like(target2[visible])
    pred2[visible] -= 3.0
    assert torch.equal(reconstruction_loss(pred2, target2, mask, norm_pix), base)
    # ...while a removed patch does count.
    target3 = target.clone()
    target3[0, 1] += 1.0 + torch.arange(12.0)
    assert not torch.allclose(reconstruction_loss(pred, target3, mask, norm_pix), base)


def test_loss_is_mean_over_removed_patches_of_per_patch_mse() -> None:
    pred, target, mask = _example()
    per_patch = ((pred - target) ** 2).mean(-1)
    removed = [per_patch[n, i] for n in range(3) for i in range(8) if mask[n, i] == 1]
    expected = sum(removed) / len(removed)
    torch.testing.assert_close(reconstruction_loss(pred, target, mask, norm_pix_loss=False), expected)


def test_norm_pix_uses_unbiased_variance_and_eps() -> None:
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    values = target.flatten().tolist()
    mean = sum(values) / 4
    var_unbiased = sum((v - mean) ** 2 for v in values) / 3
    expected = torch.tensor([[[(v - mean) / math.sqrt(var_unbiased + 1e-6) for v in values]]])
    torch.testing.assert_close(normalize_patches(target), expected)
    # A constant patch stays finite (eps), mapping to zeros.
    flat = normalize_patches(torch.full((1, 1, 4), 7.0))
    assert torch.equal(flat, torch.zeros(1, 1, 4))


def test_no_removed_patch_gives_zero_not_nan() -> None:
    pred, target, _ = _example()
    loss = reconstruction_loss(pred, target, torch.zeros(3, 8))
    assert loss.item() == 0.0


def test_shape_mismatch_is_reported() -> None:
    pred, target, mask = _example()
    with pytest.raises(ValueError, match="shape mismatch"):
        reconstruction_loss(pred, target[:, :4], mask)


def test_classification_loss_divides_by_temperature() -> None:
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(classification_loss(logits, labels, 10.0), F.cross_entropy(logits / 10.0, labels))
    assert not torch.allclose(classification_loss(logits, labels, 10.0), F.cross_entropy(logits, labels))


def _output(with_pred: bool = True, with_logits: bool = True) -> SupMAEOutput:
    pred, _, mask = _example()
    logits = torch.randn(3, 5, requires_grad=True)
    loss_rec = torch.tensor(0.9, requires_grad=True)
    return SupMAEOutput(loss_rec, pred if with_pred else None, mask, logits if with_logits else None)


def test_supmae_loss_weights_and_terms() -> None:
    out = _output()
    labels = torch.tensor([1, 4, 0])
    total, rec, cls = supmae_loss(out, labels)
    ce = F.cross_entropy(out.logits / 10.0, labels)
    torch.testing.assert_close(rec, torch.tensor(0.9))
    torch.testing.assert_close(cls, 0.01 * ce)
    torch.testing.assert_close(total, rec + cls)
    total, rec, cls = supmae_loss(out, labels, rec_weight=0.5, cls_weight=2.0, temperature=1.0)
    torch.testing.assert_close(rec, torch.tensor(0.45))
    torch.testing.assert_close(cls, 2.0 * F.cross_entropy(out.logits, labels))


def test_supmae_loss_switches_terms_off() -> None:
    labels = torch.tensor([1, 4, 0])
    # Classification off by weight: the logits take no part in the graph.
    out = _output()
    total, _, cls = supmae_loss(out, labels, cls_weight=0.0)
    assert cls.item() == 0.0
    total.backward()
    assert out.logits.grad is None and out.loss_rec.grad is not None
    # No head at all (MAE).
    total, _, cls = supmae_loss(_output(with_logits=False), labels)
    assert cls.item() == 0.0
    # No decoder (masked supervised): the reconstruction term is an exact zero.
    out = _output(with_pred=False)
    total, rec, cls = supmae_loss(out, labels)
    assert rec.item() == 0.0
    torch.testing.assert_close(total, cls)
    with pytest.raises(UserError, match="nothing to train"):
        supmae_loss(_output(with_pred=False), labels, cls_weight=0.0)
