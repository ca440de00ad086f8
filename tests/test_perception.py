"""perception.py: the perception-aware attribute on hand-made boxes, where its sidecar goes, the
degenerate-attribute warning; and the perception-aware loss (docs/paper.md section 3): FPN mask head, L_m
(BCE), L_d (Dice), sqrt(alpha_bar_t)."""
import json
import math
from pathlib import Path

import pytest
import torch

import config
import data
import diffusion
import perception
import train
import unet
from data_sets import shapes
from perceptive import attributes, detections
from conftest import TINY_MODEL, one_line_naming


# ----------------------------------------------------------------------------------------------
# attributes

GT = [[0, 0, 10, 10]]


@pytest.mark.parametrize("score, box, want", [
    (0.9, [0, 0, 6, 10], "easy"),     # score > gamma, IoU 0.6 > beta
    (0.4, [0, 0, 6, 10], "hard"),     # score == gamma: not kept (strict >)
    (0.3, [0, 0, 6, 10], "hard"),     # score < gamma
    (0.9, [0, 0, 5, 10], "hard"),     # IoU exactly 0.5 == beta: not a match (strict >)
    (0.9, [0, 0, 4, 10], "hard"),     # IoU 0.4 < beta
    (0.41, [0, 0, 10, 10], "easy"),   # just above gamma, perfect box
])
def test_attribute_thresholds(score, box, want):
    assert perception.assign_attributes(GT, [0], [box], [score], [0], gamma=0.4, beta=0.5) == [want]


def test_attribute_needs_one_prediction_passing_both_thresholds():
    # a good box with a low score and a confident bad box: neither passes both tests
    preds, scores = [[0, 0, 10, 10], [0, 0, 3, 10]], [0.2, 0.99]
    assert perception.assign_attributes(GT, [0], preds, scores, [0, 0], gamma=0.4,
                                        beta=0.5) == ["hard"]
    assert perception.assign_attributes(GT, [0], preds, scores, [0, 0], gamma=0.1,
                                        beta=0.5) == ["easy"]


def test_attribute_per_object_and_empty_cases():
    gts = [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]]
    preds = [[0, 0, 10, 9], [21, 21, 31, 31], [0, 0, 1, 1]]        # IoU 0.9, 81/119 = 0.68, ~0
    assert perception.assign_attributes(gts, [0, 1, 2], preds, [0.9, 0.9, 0.9],
                                        [0, 1, 2]) == ["easy", "easy", "hard"]
    assert perception.assign_attributes(gts, [0, 1, 2], [], [], []) == ["hard"] * 3
    assert perception.assign_attributes([], [], preds, [0.9] * 3, [0] * 3) == []


def test_attribute_class_aware_variant():
    box = [[0, 0, 10, 10]]
    # right place, wrong class: easy when class-agnostic (the paper's rule), hard when class-aware
    assert perception.assign_attributes(GT, [1], box, [0.9], [2], class_aware=False) == ["easy"]
    assert perception.assign_attributes(GT, [1], box, [0.9], [2], class_aware=True) == ["hard"]
    # a second, right-class prediction makes it easy again; a right-class one below gamma does not
    two = [[0, 0, 10, 10], [0, 0, 9, 10]]
    assert perception.assign_attributes(GT, [1], two, [0.9, 0.8], [2, 1],
                                        class_aware=True) == ["easy"]
    assert perception.assign_attributes(GT, [1], two, [0.9, 0.3], [2, 1], gamma=0.4,
                                        class_aware=True) == ["hard"]


def test_folds_partition_the_images():
    folds = attributes.make_folds(11, 3, seed=1)
    assert sorted(sum(folds, [])) == list(range(11)) and [len(f) for f in folds] in (
        [4, 4, 3],
        [4, 3, 4],
        [3, 4, 4],
    )
    assert folds == attributes.make_folds(11, 3, seed=1)


# ----------------------------------------------------------------------------------------------
# sidecar

def test_sidecar_goes_to_the_run_folder_never_the_data_folder(shapes32, tmp_path):
    before = sorted(p.relative_to(shapes32) for p in Path(shapes32).rglob("*"))
    cfg = attributes.AttributeConfig(folds=2, steps=2, batch_size=8, image_size=32)
    with pytest.raises(config.DataError) as e:
        attributes.make_attributes(shapes32, Path(shapes32) / "runs", cfg)
    assert "data folder" in str(e.value)
    summary = attributes.make_attributes(shapes32, tmp_path / "run", cfg, log=lambda m: None)
    assert sorted(p.relative_to(shapes32) for p in Path(shapes32).rglob("*")) == before
    side = json.loads((tmp_path / "run" / "attributes.json").read_text())
    for split in ("train", "val"):
        ds = data.CocoLayoutDataset(shapes32, split, size=32)
        kept = {int(a) for i in range(len(ds)) for a in ds.load(i)["ann_ids"]}
        assert {int(k) for k in side["attributes"][split]} == kept
        assert set(side["attributes"][split].values()) <= {"easy", "hard"}
        assert 0 <= summary[split]["hard_fraction"] <= 1
    assert (side["gamma"], side["beta"], side["folds"]) == (cfg.gamma, cfg.beta, 2) and side["detector"]
    assert set(summary["train"]["per_nuisance"]) <= {"none", *shapes.NUISANCES}
    assert (tmp_path / "run" / "attributes.png").exists()
    # the data set reads the sidecar back
    attrs = perception.load_attributes(tmp_path / "run" / "attributes.json")
    assert (data.CocoLayoutDataset(shapes32, "train", size=32,
                                   attributes=attrs)[0]["difficulty"] > 0).all()


def test_attributes_from_a_results_json_of_both_splits(shapes32, tmp_path):
    # the ground truth as detections: every object is easy; an unknown image id is an error naming
    # the file
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for split in ("train", "val")
           for a in json.loads((Path(shapes32) / "annotations" / f"instances_{split}.json").read_text())["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    summary = attributes.make_attributes(shapes32, tmp_path / "run",
                                         attributes.AttributeConfig(image_size=32),
                                         source=detections.ResultsFile(tmp_path / "res.json"),
                                         log=lambda m: None)
    assert summary["train"]["hard"] == 0 and summary["val"]["hard"] == 0 and summary["train"]["n"] > 0
    (tmp_path / "bad.json").write_text(json.dumps(res + [dict(res[0], image_id=999)]))
    with pytest.raises(config.DataError) as e:
        attributes.make_attributes(shapes32, tmp_path / "run2",
                                   attributes.AttributeConfig(image_size=32),
                                   source=detections.ResultsFile(tmp_path / "bad.json"),
                                   log=lambda m: None)
    assert one_line_naming(e, tmp_path / "bad.json") and "999" in str(e.value)


# ---------------------------------------------------------------------------------------------- a
# degenerate attribute


def test_degenerate_attribute_warning():
    assert attributes.attribute_warning(0.5, "d") is None and attributes.attribute_warning(0.9, "d") is None
    assert attributes.attribute_warning(0.05, "d") is None
    high, low = attributes.attribute_warning(0.992,
                                             "from-scratch"), attributes.attribute_warning(0.01, "d")
    assert high.startswith("warning: 99.2% of the training objects are hard") and "from-scratch" in high
    assert "--detector torchvision:NAME --detector-weights FILE" in high and "--attr-steps" in high
    assert low.startswith("warning: only 1.0% of the training objects are hard") and "--gamma" in low


def test_attribute_stage_warns_when_the_detector_finds_nothing(shapes32, tmp_path):
    # detections for the val images only: every training object is hard, and the summary and the log
    # say why
    res = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=0.9)
           for a in json.loads((Path(shapes32) / "annotations" / "instances_val.json").read_text())["annotations"]]
    (tmp_path / "res.json").write_text(json.dumps(res))
    logged = []
    summary = attributes.make_attributes(shapes32, tmp_path / "run",
                                         attributes.AttributeConfig(image_size=32),
                                         source=detections.ResultsFile(tmp_path / "res.json"),
                                         log=logged.append)
    assert summary["train"]["hard_fraction"] == 1.0 and summary["val"]["hard_fraction"] == 0.0
    assert summary["train"]["warning"].startswith("warning: 100.0% of the training objects are hard")
    assert logged[-1] == summary["train"]["warning"]
    side = json.loads((tmp_path / "run" / "attributes.json").read_text())
    assert side["summary"]["train"]["warning"] == summary["train"]["warning"]


# ---------------------------------------------------------------------------------------------- the
# perception loss

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
    diff = diffusion.Diffusion(1000, "linear")
    t = torch.tensor([10, 500, 990])
    lp = perception.perception_loss(logits, masks, valid, diff.alpha_bar[t])
    inner = (perception.mask_bce(logits, masks) + perception.mask_dice(logits, masks)).mean(1)
    assert torch.allclose(lp, diff.alpha_bar[t].sqrt() * inner)
    same = perception.perception_loss(logits[:1].expand(3, -1, -1, -1),
                                      masks[:1].expand(3, -1, -1, -1), valid,
                                      diff.alpha_bar[t])
    assert same[0] > same[1] > same[2] > 0                   # weight sqrt(alpha_bar_t) falls with t


def test_padding_objects_contribute_nothing():
    torch.manual_seed(1)
    logits, masks = torch.randn(2, 3, 8, 8), (torch.rand(2, 3, 8, 8) > 0.5).float()
    valid = torch.tensor([[True, False, False], [True, True, False]])
    ab = torch.tensor([0.5, 0.5])
    base = perception.perception_loss(logits, masks, valid, ab)
    junk_logits, junk_masks = logits.clone(), masks.clone()
    junk_logits[~valid] = 100.0                                           # anything at padded slots
    junk_masks[~valid] = 0.0
    assert torch.allclose(perception.perception_loss(junk_logits, junk_masks, valid, ab), base)
    none = perception.perception_loss(logits, masks, torch.zeros(2, 3, dtype=torch.bool), ab)
    assert torch.equal(none, torch.zeros(2))                       # no objects (a null prompt) -> 0


def test_targets_are_area_resized_to_the_head_resolution():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1                                                # top-left quarter at 4x4
    masks[0, 0, 2, 2] = 1                                   # one pixel of the bottom-right 2x2 cell
    logits = torch.zeros(1, 1, 2, 2)
    got = perception.perception_loss(logits, masks, torch.ones(1, 1, dtype=torch.bool),
                                     torch.ones(1))
    # fraction of each cell covered
    target = torch.tensor([[1.0, 0.0], [0.0, 0.25]]).view(1, 1, 2, 2)
    want = perception.mask_bce(logits, target) + perception.mask_dice(logits, target)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_head_gives_one_mask_per_object_and_gradients_reach_the_unet():
    torch.manual_seed(0)
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=3)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL, mask_dim=8))
    x = torch.randn(2, 3, 16, 16)
    tokens = torch.stack([tok.encode(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0])),
                          tok.encode(torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]]),
                                     torch.tensor([0, 1]))])
    _, aux = m(x, torch.tensor([3, 40]), tokens, return_features=True)
    assert aux["mask_logits"].shape == (2, 3, 16, 16)
    assert aux["object_valid"].tolist() == [[True, False, False], [True, True, False]]
    masks = torch.zeros(2, 3, 16, 16)
    masks[:, 0, 2:8, 2:8] = 1
    lp = perception.perception_loss(aux["mask_logits"], masks, aux["object_valid"],
                                    torch.tensor([0.9, 0.5]))
    lp.mean().backward()
    # the loss reaches the UNet's down path, up path and the layout encoder through the head (at
    # initialisation each residual branch ends in a zero conv, so the inner convs of a block get no
    # gradient yet; the zero convs, skips and everything before them do)
    grads = {n: p.grad for n, p in m.named_parameters()}
    for part in ("conv_in.", "down.", "up.", "mid1.", "encoder.tok_emb."):
        assert any(g is not None and g.abs().sum() > 0 for n,
                   g in grads.items() if n.startswith(part)), part
    assert grads["out.2.weight"] is None                   # eps_theta's output conv is not involved


def test_no_head_without_the_perception_loss(tiny_data, tmp_path):
    from conftest import tiny_train_cfg
    model = train.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=2, pal_weight=0.0),
                        TINY_MODEL)
    assert model.mask_head is None and model.cfg.mask_dim == 0
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=False)
    assert ck["history"]["l_p"] == [] and len(ck["history"]["l_simple"]) == 2
