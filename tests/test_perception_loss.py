"""The perception-aware loss (PAPER.md section 3): FPN mask head, L_m (BCE), L_d (Dice), sqrt(alpha_bar_t)."""
import math

import pytest
import torch

import data
import detdiff
import perception
import unet
from conftest import TINY_MODEL


def test_bce_and_dice_against_hand_computed_values():
    # one object, a 1x2 "image": logits 0 and log(3) -> p = 0.5 and 0.75; target 1 and 0
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    bce = (-math.log(0.5) - math.log(1 - 0.75)) / 2                       # mean over the two pixels
    dice = 1 - (2 * 0.5 + 1) / ((0.5 + 0.75) + 1.0 + 1)                     # smooth = 1
    assert perception.mask_bce(logits, target).item() == pytest.approx(bce, rel=1e-6)
    assert perception.mask_dice(logits, target).item() == pytest.approx(dice, rel=1e-6)


def test_perception_loss_is_sqrt_alpha_bar_times_bce_plus_dice_and_falls_with_t():
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.5).float()
    valid = torch.ones(3, 2, dtype=torch.bool)
    diff = detdiff.Diffusion(1000)
    t = torch.tensor([10, 500, 990])
    lp = perception.perception_loss(logits, masks, valid, diff.alpha_bar[t])
    inner = (perception.mask_bce(logits, masks) + perception.mask_dice(logits, masks)).mean(1)
    assert torch.allclose(lp, diff.alpha_bar[t].sqrt() * inner)
    same = perception.perception_loss(logits[:1].expand(3, -1, -1, -1), masks[:1].expand(3, -1, -1, -1), valid,
                                      diff.alpha_bar[t])
    assert same[0] > same[1] > same[2] > 0                                # weight sqrt(alpha_bar_t) falls with t


def test_padding_objects_contribute_nothing():
    torch.manual_seed(1)
    logits, masks = torch.randn(2, 3, 8, 8), (torch.rand(2, 3, 8, 8) > 0.5).float()
    valid = torch.tensor([[True, False, False], [True, True, False]])
    ab = torch.tensor([0.5, 0.5])
    base = perception.perception_loss(logits, masks, valid, ab)
    junk_logits, junk_masks = logits.clone(), masks.clone()
    junk_logits[~valid] = 100.0                                            # anything at padded slots
    junk_masks[~valid] = 0.0
    assert torch.allclose(perception.perception_loss(junk_logits, junk_masks, valid, ab), base)
    none = perception.perception_loss(logits, masks, torch.zeros(2, 3, dtype=torch.bool), ab)
    assert torch.equal(none, torch.zeros(2))                               # no objects (a null prompt) -> 0


def test_targets_are_area_resized_to_the_head_resolution():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1                                                # top-left quarter at 4x4
    masks[0, 0, 2, 2] = 1                                                  # one pixel of the bottom-right 2x2 cell
    logits = torch.zeros(1, 1, 2, 2)
    got = perception.perception_loss(logits, masks, torch.ones(1, 1, dtype=torch.bool), torch.ones(1))
    target = torch.tensor([[1.0, 0.0], [0.0, 0.25]]).view(1, 1, 2, 2)      # fraction of each cell covered
    want = perception.mask_bce(logits, target) + perception.mask_dice(logits, target)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_head_gives_one_mask_per_object_and_gradients_reach_the_unet():
    torch.manual_seed(0)
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=3)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL, mask_dim=8))
    x = torch.randn(2, 3, 16, 16)
    tokens = torch.stack([tok.encode(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0])),
                          tok.encode(torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]]), torch.tensor([0, 1]))])
    _, aux = m(x, torch.tensor([3, 40]), tokens, return_features=True)
    assert aux["mask_logits"].shape == (2, 3, 16, 16)
    assert aux["object_valid"].tolist() == [[True, False, False], [True, True, False]]
    masks = torch.zeros(2, 3, 16, 16)
    masks[:, 0, 2:8, 2:8] = 1
    lp = perception.perception_loss(aux["mask_logits"], masks, aux["object_valid"], torch.tensor([0.9, 0.5]))
    lp.mean().backward()
    # the loss reaches the UNet's down path, up path and the layout encoder through the head
    # (at initialisation each residual branch ends in a zero conv, so the inner convs of a block get no
    # gradient yet; the zero convs, skips and everything before them do)
    grads = {n: p.grad for n, p in m.named_parameters()}
    for part in ("conv_in.", "down.", "up.", "mid1.", "encoder.tok_emb."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    assert grads["out.2.weight"] is None                                   # eps_theta's output conv is not involved


def test_no_head_without_the_perception_loss(tiny_data, tmp_path):
    from conftest import tiny_train_cfg
    model = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=2, pal_weight=0.0), TINY_MODEL)
    assert model.mask_head is None and model.cfg.mask_dim == 0
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=False)
    assert ck["history"]["l_p"] == [] and len(ck["history"]["l_simple"]) == 2
