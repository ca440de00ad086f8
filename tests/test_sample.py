"""sample.py: guidance, the sampling loops, rebuilding from a checkpoint, layouts in and COCO json
out."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import diffusion
import sample
from data_sets import export
from experiments import crops
from conftest import one_line_naming
from test_diffusion import GaussianEps

REPO = Path(__file__).resolve().parents[1]


class Stub(torch.nn.Module):
    """eps(x, t, tokens) = x * (first token): makes the guided combination checkable by hand."""
    def forward(self, x, t, tokens):
        return x * tokens[:, :1, None, None].float()


def test_guidance_formula():
    x, t = torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    tokens, null = torch.tensor([[5, 0], [7, 0]]), torch.tensor([1, 0])
    e = sample.guided_eps(Stub(), x, t, tokens, null, 3.0)
    assert torch.allclose(e[:, 0, 0, 0], torch.tensor([1 + 3 * (5 - 1.0), 1 + 3 * (7 - 1.0)]))
    assert torch.equal(sample.guided_eps(Stub(), x, t, tokens, null, 1.0),
                       x * torch.tensor([5.0, 7.0]).view(2, 1, 1, 1))


class SumStub(torch.nn.Module):
    """eps(x, t, tokens) = x * (sum of the token ids): [easy] (5) / [hard] (6) vs [none] (4) changes
    it by hand."""
    def forward(self, x, t, tokens):
        return x * tokens.sum(1)[:, None, None, None].float()


def test_attribute_guidance_against_hand_computed_values():
    tok = data.LayoutTokenizer(["a", "b"], bins=4, max_objects=2)
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    # one [hard] object
    tokens = torch.stack([tok.encode(box, torch.tensor([1]), torch.tensor([2])),
                          # one [easy] object
                          tok.encode(box, torch.tensor([0]), torch.tensor([1]))])
    null = tok.null_prompt()
    x, t = torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    c, n = tokens.sum(1).float(), null.sum().float()         # eps(layout d) and eps(null) per image
    p = c - torch.tensor([6.0 - 4, 5.0 - 4])             # eps(layout [none]): the attribute id -> 4
    # noqa: E731
    e = lambda s, w: sample.guided_eps(SumStub(), x, t, tokens, null, s, attr_guidance=w)[
        :, 0, 0, 0
    ]
    assert torch.allclose(e(3.0, 1.0), n + 3 * (c - n))    # w_d = 1: plain classifier-free guidance
    assert torch.allclose(e(3.0, 0.0), n + 3 * (p - n))      # w_d = 0: the [none] prompt's guidance
    assert torch.allclose(e(1.0, 1.0), c)                   # s = w_d = 1: the plain conditional eps
    assert torch.allclose(e(1.0, 0.0), p)               # s = 1, w_d = 0: the [none] conditional eps
    assert torch.allclose(e(3.0, 2.5), n + 3 * ((p - n) + 2.5 * (c - p)))
    plain = diffusion.drop_attributes(tokens, 1.0)   # no attribute to guide on: w_d changes nothing
    assert torch.equal(sample.guided_eps(SumStub(), x, t, plain, null, 3.0, attr_guidance=4.0),
                       sample.guided_eps(SumStub(), x, t, plain, null, 3.0))


def test_sample_cli_attr_guidance_default_follows_the_checkpoint_and_warns(ckpt, tmp_path, capsys):
    ck = torch.load(ckpt, weights_only=False)
    assert ck["train_cfg"]["p_uncond_attr"] == 0.2        # the default trains the [none] prediction
    old = dict(ck, train_cfg=dict(ck["train_cfg"], p_uncond_attr=0.0))
    torch.save(old, tmp_path / "old.pt")
    assert (
        sample.resolve_attr_guidance(-1, ck) == diffusion.ATTR_GUIDANCE
        and sample.resolve_attr_guidance(-1, old) == 1
    )
    assert sample.resolve_attr_guidance(2.5, old) == 2.5
    args = ["--n", "2", "--steps", "2", "--batch", "2", "--dtype", "fp32", "--difficulty", "hard"]
    # noqa: E731
    img = lambda d: torch.from_numpy(np.array(Image.open(tmp_path / d / "train" / "00000.png")))
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "plain"), "--attr-guidance",
                 "1"] + args)
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "auto")] + args)
    out = capsys.readouterr().out
    assert f"attribute guidance {diffusion.ATTR_GUIDANCE:g}," in out and "warning" not in out
    assert not torch.equal(img("plain"), img("auto"))             # the [hard] tokens were guided on
    export.main(["--ckpt", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old_auto")] + args)
    assert "attribute guidance 1," in capsys.readouterr().out    # no trained [none]: plain guidance
    export.main(["--ckpt", str(tmp_path / "old.pt"), "--out", str(tmp_path / "old_4"),
                 "--attr-guidance", "4"] + args)
    assert "trained without attribute-only dropout (--p-uncond-attr 0)" in capsys.readouterr().out


@pytest.mark.parametrize("sampler, steps", [("dpm++2m", 15), ("dpm++2m", 20), ("ddim", 15)])
def test_generate_calls_the_model_once_per_step_asked(sampler, steps):
    """`steps` model calls (guidance 1, attribute guidance off: one forward per step) on the default
    cosine schedule, for each sampler."""
    diff = diffusion.Diffusion(1000, "cosine")
    model, calls = GaussianEps(diff), []
    model.register_forward_hook(lambda m, args, out: calls.append(int(args[1][0])))
    sample.generate(model, diff, torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                    4, steps, sampler, guidance=1.0, generator=torch.Generator().manual_seed(0),
                    progress=False)
    assert len(calls) == steps and len(set(calls)) == steps and calls[-1] == 0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_rebuild_from_checkpoint_and_generate(ckpt, sampler):
    model, tok, diff, ck = sample.load_checkpoint(ckpt)
    assert not model.training and diff.T == 50
    layout = tok.encode(torch.tensor([[0.1, 0.2, 0.6, 0.7]]), torch.tensor([1]))[None]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample.generate(model, diff, layout, tok.null_prompt(), 16, 5, sampler, 0.0, 2.0, g1,
                        progress=False)
    b = sample.generate(model, diff, layout, tok.null_prompt(), 16, 5, sampler, 0.0, 2.0, g2,
                        progress=False)
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1.0


def test_sample_cli_val_layouts_writes_images_json_and_grid(ckpt, tmp_path):
    out = tmp_path / "o"
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--n", "3", "--steps", "2", "--batch", "2",
                 "--difficulty", "hard"])
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 3 and len(list((out / "train").glob("*.png"))) == 3
    assert Image.open(out / "train" / "00000.png").size == (16, 16) and (out / "grid.png").is_file()
    assert coco["annotations"] and all(a["difficulty"] == "hard" for a in coco["annotations"])
    assert all(0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= 16.001 for a in coco["annotations"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert all(a["category_id"] in names for a in coco["annotations"])


def test_sample_cli_user_layout_json(ckpt, tmp_path):
    _, tok, _, _ = sample.load_checkpoint(ckpt)
    name = tok.class_names[1]
    lay = {"layouts": [{"width": 200, "height": 100, "objects": [
        {"category": name, "bbox": [50, 25, 100, 50], "difficulty": "easy"}]}]}
    (tmp_path / "l.json").write_text(json.dumps(lay))
    export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--layouts",
                 str(tmp_path / "l.json"),
                 "--steps", "2"])
    ann = json.loads((tmp_path / "o" / "annotations" / "instances_train.json").read_text())["annotations"]
    assert len(ann) == 1 and ann[0]["bbox"] == pytest.approx([4.0, 4.0, 8.0, 8.0]) and ann[0]["difficulty"] == "easy"
    # the written folder is a COCO-format data set that data.py reads back with the same boxes
    ds = data.CocoLayoutDataset(tmp_path / "o", "train", size=16, min_area=0)
    assert ds.class_names == tok.class_names and torch.allclose(ds[0]["boxes"], torch.tensor([[0.25, 0.25, 0.75, 0.75]]))


def test_sample_cli_never_writes_into_an_existing_folder(ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit, match="mine already exists and is not empty"):
        export.main(["--ckpt", str(ckpt), "--out", str(out), "--n", "1", "--steps", "2"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_load_checkpoint_refuses_a_missing_or_foreign_file_in_one_line(ckpt, tmp_path):
    with pytest.raises(config.DataError, match="nope.pt: checkpoint not found") as e:
        sample.load_checkpoint(tmp_path / "nope.pt")
    assert one_line_naming(e, tmp_path / "nope.pt")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(config.DataError,
                       match=r"junk.pt: not a detdiff checkpoint \(KeyError") as e:
        sample.load_checkpoint(tmp_path / "junk.pt")
    assert one_line_naming(e, tmp_path / "junk.pt")
    torch.save(dict(torch.load(ckpt, weights_only=False), ema={}), tmp_path / "noweights.pt")
    with pytest.raises(config.DataError,
                       match=r"noweights.pt: not a detdiff checkpoint \(RuntimeError") as e:
        sample.load_checkpoint(tmp_path / "noweights.pt")        # load_state_dict's many-line
                                                                 # message, on one line
    assert one_line_naming(e, tmp_path / "noweights.pt")


def test_split_layouts_names_a_missing_attribute_sidecar(tmp_path):
    side = tmp_path / "attributes.json"
    with pytest.raises(config.DataError,
                       match="attributes.json: the attribute sidecar this run trained with is "
                       "missing") as e:
        sample.split_layouts(dict(train_cfg={}, attributes_used=str(side)), 1)
    assert one_line_naming(e, side)


def test_sample_command_prints_one_error_line_and_exits_1(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt",
                        str(tmp_path / "nope.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == f"error: {tmp_path / 'nope.pt'}: checkpoint not found"


def test_sample_main_turns_a_layout_error_into_one_line(ckpt, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layouts": [{"width": 10, "height": 10,
                                            "objects": [{"category": "unicorn",
                                                                                    "bbox": [0, 0, 5, 5]}]}]}))
    with pytest.raises(SystemExit,
                       match="^error: .*bad.json: layout 0 object 0: unknown category 'unicorn'"):
        export.main(["--ckpt", str(ckpt), "--layouts", str(bad), "--out", str(tmp_path / "x")])


def test_unknown_sampler_is_refused():
    diff = diffusion.Diffusion(10, "linear")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample.generate(GaussianEps(diff), diff, torch.zeros(1, 1, dtype=torch.long),
                        torch.zeros(1, dtype=torch.long),
                        4, 2, "euler", progress=False)


def test_class_filter_drops_images_with_a_rejected_object(ckpt, tmp_path):
    _, tok, _, _ = sample.load_checkpoint(ckpt)
    names = list(tok.class_names)
    clf = crops.CropClassifier(len(names), names, width=4, size=8)
    torch.nn.init.zeros_(clf.head.weight)
    with torch.no_grad():
        # every crop: class 0, p ~ 1
        clf.head.bias.copy_(torch.tensor([10.0] + [0.0] * (len(names) - 1)))
    crops.save_crop_classifier(clf, tmp_path / "clf.pt")
    # noqa: E731
    objs = lambda *cs: [dict(category=names[c], bbox=[2 + 5 * i, 2, 6, 6]) for i,
                        c in enumerate(cs)]
    lays = dict(
        layouts=[
            dict(width=16, height=16, objects=o) for o in (objs(0), objs(1), objs(0, 0), objs(0, 2))
        ]
    )
    (tmp_path / "l.json").write_text(json.dumps(lays))
    out = tmp_path / "o"
    export.main(["--ckpt", str(ckpt), "--out", str(out), "--layouts", str(tmp_path / "l.json"),
                 "--steps", "2",
                 "--classifier", str(tmp_path / "clf.pt")])
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == 3      # layouts 0 and 2 kept
    assert {a["category_id"] for a in coco["annotations"]} == {coco["categories"][0]["id"]}
    other = crops.CropClassifier(2, ["cat", "dog"], width=4, size=8)
    crops.save_crop_classifier(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"other.pt: classes cat, dog are not the checkpoint's"):
        export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o2"), "--layouts",
                     str(tmp_path / "l.json"),
                     "--steps", "2", "--classifier", str(tmp_path / "other.pt")])


# ---- exported instance masks and the YOLO folder
# ----------------------------------------------------


def test_masks_round_trip_through_the_readers_rle(tmp_path):
    S = 16
    rng = np.random.default_rng(0)
    lays = [dict(boxes=torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]]),
                 labels=torch.tensor([0, 1]),
                 difficulty=torch.tensor([1, 2]))]
    masks = [np.zeros((2, S, S), bool)]
    masks[0][0, 1:7, 2:8] = rng.random((6, 6)) > 0.3   # an irregular blob
    images = [np.zeros((S, S, 3), np.uint8)]    # object 1's mask is empty: it falls back to its box
    js = export.write_coco(tmp_path, "train", images, lays, ["a", "b"], [3, 9], masks)
    a0, a1 = js["annotations"]
    assert a0["mask"] == "head" and isinstance(a0["segmentation"],
                                               dict) and a0["area"] == masks[0][0].sum()
    assert a1["mask"] == "box" and a1["segmentation"] == [[4.0, 8.0, 16.0, 8.0, 16.0, 16.0, 4.0, 16.0]]
    got = data.CocoLayoutDataset(tmp_path, "train", size=S, min_area=0).load(0)["masks"]
    assert np.array_equal(got[0], masks[0][0])  # data.rle_to_mask through the data set, bit for bit
    assert got[1].sum() == 12 * 8 and got[1][8:, 4:].all()               # the filled box


def test_yolo_labels_against_hand_made_boxes(tmp_path):
    lays = [dict(boxes=torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.5, 1.0, 1.0]]),
                 labels=torch.tensor([2, 0]),
                 difficulty=torch.tensor([1, 1])),
            dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 difficulty=torch.zeros(0))]
    images = [np.full((8, 8, 3), k, np.uint8) for k in (10, 20)]
    export.write_coco(tmp_path, "train", images, lays, ["a", "b", "c d"], [1, 2, 5])
    export.write_yolo(tmp_path, "train", lays, ["a", "b", "c d"])
    y = tmp_path / "yolo"
    assert (y / "labels" / "train" / "00000.txt").read_text() == \
        "2 0.300000 0.400000 0.400000 0.400000\n0 0.500000 0.750000 1.000000 0.500000\n"
    # an image without objects: an empty file
    assert (y / "labels" / "train" / "00001.txt").read_text() == ""
    assert np.array_equal(np.array(Image.open(y / "images" / "train" / "00001.png")), images[1])
    yaml = (y / "data.yaml").read_text()
    assert "train: images/train" in yaml and 'names:\n  0: "a"\n  1: "b"\n  2: "c d"\n' in yaml


def test_sample_cli_exports_head_masks_yolo_and_box_masks(ckpt, tmp_path, capsys):
    args = ["--ckpt", str(ckpt), "--n", "3", "--steps", "3", "--batch", "2", "--dtype", "fp32"]
    # every in-box pixel
    export.main(args + ["--out", str(tmp_path / "head"), "--mask-threshold", "0.0"])
    assert "the perception head's masks (last 3 steps" in capsys.readouterr().out
    coco = json.loads((tmp_path / "head" / "annotations" / "instances_train.json").read_text())
    assert coco["annotations"] and all(a["mask"] == "head" for a in coco["annotations"])
    ds = data.CocoLayoutDataset(tmp_path / "head", "train", size=16, min_area=0)
    for i in range(len(ds)):                    # threshold 0 keeps the whole box: mask = box pixels
        it = ds.load(i)
        for box, m in zip(it["boxes"], it["masks"]):
            c = (np.arange(16) + 0.5) / 16
            inbox = ((c >= box[1]) & (c <= box[3]))[:, None] & ((c >= box[0]) & (c <= box[2]))[
                None, :
            ]
            assert np.array_equal(m, inbox)
    assert (tmp_path / "head" / "masks.png").is_file() and (tmp_path / "head" / "yolo" / "data.yaml").is_file()
    assert len(list((tmp_path / "head" / "yolo" / "labels" / "train").glob("*.txt"))) == 3
    export.main(args + ["--out", str(tmp_path / "box"), "--masks", "box"])
    coco_box = json.loads((tmp_path / "box" / "annotations" / "instances_train.json").read_text())
    assert all(isinstance(a["segmentation"],
                          list) and "mask" not in a for a in coco_box["annotations"])
    assert not (tmp_path / "box" / "masks.png").exists()
    same = lambda d: np.array(Image.open(tmp_path / d / "train" / "00000.png"))  # noqa: E731
    assert np.array_equal(same("head"), same("box"))            # reading the masks changes no pixel
    ck = torch.load(ckpt, weights_only=False)
    nohead = dict(ck, model_cfg=dict(ck["model_cfg"], mask_dim=0),
                  ema={k: v for k, v in ck["ema"].items() if not k.startswith("mask_head.")})
    torch.save(nohead, tmp_path / "nohead.pt")
    with pytest.raises(SystemExit, match="nohead.pt: --masks head needs a perception head"):
        export.main(["--ckpt", str(tmp_path / "nohead.pt"), "--out", str(tmp_path / "x"), "--masks",
                     "head"])


@pytest.mark.parametrize("layout, says", [
    ({"width": 10, "height": 10, "objects": [{"category": "circle"}]},
     "layout 0 object 0: bbox must be [x, y, width"),
    ({"width": 0, "height": 10, "objects": []}, "layout 0: width must be a number > 0, got 0"),
    ({"height": 10, "objects": []}, "layout 0: width must be a number > 0, got None"),
    ({"width": 10, "height": 10, "objects": {"category": "circle"}},
     "layout 0: objects must be a list"),
    ({"width": 10, "height": 10, "objects": [{"category": "circle", "bbox": [0, 0, 5]}]},
     "object 0: bbox must be"),
    ({"width": 10, "height": 10, "objects": [{"category": "circle", "bbox": [20, 20, 5, 5]}]},
     "is empty inside 10x10"),
    ({"width": 10, "height": 10, "objects": ["circle"]},
     "layout 0 object 0: expected an object with category"),
])
def test_every_malformed_layout_is_one_line_naming_file_layout_and_field(tmp_path, layout, says):
    path = tmp_path / "lay.json"
    path.write_text(json.dumps({"layouts": [layout]}))
    with pytest.raises(config.DataError) as e:
        export.read_layouts(path, ["circle", "square"], 4)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value)


def test_no_layouts_and_n_zero_are_one_line_errors(ckpt, tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"layouts": []}))
    with pytest.raises(config.DataError, match="empty.json: expected"):
        export.read_layouts(path, ["circle"], 4)
    with pytest.raises(SystemExit, match="^error: --n must be at least 1, got 0$"):
        export.main(["--ckpt", str(ckpt), "--n", "0", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
