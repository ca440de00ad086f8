"""sample.py: guidance, the sampling loops, rebuilding from a checkpoint, layouts in and COCO json out."""
import json

import pytest
import torch
from PIL import Image

import data
import detdiff
import sample
from conftest import TINY_MODEL, tiny_train_cfg


@pytest.fixture(scope="module")
def ckpt(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "run"
    detdiff.train(tiny_train_cfg(tiny_data, out, steps=2, sample_every=0), TINY_MODEL)
    return out / "ckpt.pt"


class Stub(torch.nn.Module):
    """eps(x, t, tokens) = x * (first token): makes the guided combination checkable by hand."""
    def forward(self, x, t, tokens):
        return x * tokens[:, :1, None, None].float()


def test_guidance_formula():
    x, t = torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    tokens, null = torch.tensor([[5, 0], [7, 0]]), torch.tensor([1, 0])
    e = sample.guided_eps(Stub(), x, t, tokens, null, 3.0)
    assert torch.allclose(e[:, 0, 0, 0], torch.tensor([1 + 3 * (5 - 1.0), 1 + 3 * (7 - 1.0)]))
    assert torch.equal(sample.guided_eps(Stub(), x, t, tokens, null, 1.0), x * torch.tensor([5.0, 7.0]).view(2, 1, 1, 1))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_rebuild_from_checkpoint_and_generate(ckpt, sampler):
    model, tok, diff, ck = sample.load_checkpoint(ckpt)
    assert not model.training and diff.T == 50
    layout = tok.encode(torch.tensor([[0.1, 0.2, 0.6, 0.7]]), torch.tensor([1]))[None]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample.generate(model, diff, layout, tok.null_prompt(), 16, 5, sampler, 0.0, 2.0, g1, progress=False)
    b = sample.generate(model, diff, layout, tok.null_prompt(), 16, 5, sampler, 0.0, 2.0, g2, progress=False)
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b) and a.abs().max() <= 1.0


def test_sample_cli_val_layouts_writes_images_json_and_grid(ckpt, tmp_path):
    out = tmp_path / "o"
    sample.main(["--ckpt", str(ckpt), "--out", str(out), "--n", "3", "--steps", "2", "--batch", "2",
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
    sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--layouts", str(tmp_path / "l.json"),
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
        sample.main(["--ckpt", str(ckpt), "--out", str(out), "--n", "1", "--steps", "2"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_inputs_give_one_line_errors(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="nope.pt: checkpoint not found"):
        sample.main(["--ckpt", str(tmp_path / "nope.pt")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layouts": [{"width": 10, "height": 10, "objects": [{"category": "unicorn",
                                                                                 "bbox": [0, 0, 5, 5]}]}]}))
    with pytest.raises(SystemExit, match="bad.json: layout 0 object 0: unknown category 'unicorn'"):
        sample.main(["--ckpt", str(ckpt), "--layouts", str(bad), "--out", str(tmp_path / "x")])
    notck = tmp_path / "junk.pt"
    torch.save({"a": 1}, notck)
    with pytest.raises(SystemExit, match="not a detdiff checkpoint"):
        sample.load_checkpoint(notck)
