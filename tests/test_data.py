"""data.py: the COCO reader on every awkward case real files have, resize consistency, the layout
tokens, collate and loaders, data sets by name, and the commands."""
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
from data_sets import coco, shapes

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# reader

def write_coco(root, images, annotations, categories=None, split="train"):
    """A COCO-format folder: images = [(id, file_name, PIL image or bytes or None, (w, h) in
    json)]."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    recs = []
    for image_id, name, im, (w, h) in images:
        if isinstance(im, bytes):
            (root / split / name).write_bytes(im)
        elif im is not None:
            im.save(root / split / name)
        recs.append(dict(id=image_id, file_name=name, width=w, height=h))
    cats = categories or [dict(id=3, name="car"), dict(id=1, name="person"), dict(id=7, name="dog")]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(dict(images=recs, annotations=annotations, categories=cats)))
    return path


def ann(i, image_id, bbox, cat=1, iscrowd=0, **kw):
    return dict(id=i, image_id=image_id, category_id=cat, bbox=bbox, iscrowd=iscrowd, **kw)


@pytest.fixture
def awkward(tmp_path):
    """Every case real COCO files have: image modes, empty image, border boxes, zero area, crowd,
    RLEs."""
    rgb = Image.new("RGB", (40, 30), (10, 200, 30))
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    images = [(1, "rgb.png", rgb, (40, 30)),
              (2, "gray.png", Image.new("L", (40, 30), 77), (40, 30)),
              (3, "pal.png", rgb.convert("P"), (40, 30)),
              (4, "rgba.png", Image.new("RGBA", (40, 30), (0, 0, 255, 255)), (40, 30)),
              (5, "cmyk.jpg", cmyk, (40, 30)), (6, "empty.png", rgb, (40, 30))]
    rle = coco.mask_to_rle(np.pad(np.ones((10, 10), bool), ((5, 15), (10, 20))))
    anns = [ann(1, 1, [10, 5, 20, 10], segmentation=[[10, 5, 30, 5, 30, 15, 10, 15]]),
            ann(2, 1, [30, 20, 20, 20], cat=7),                      # runs past the border: clipped
            ann(3, 2, [5, 5, 0, 10]),                                           # zero area: dropped
            ann(4, 2, [0, 0, 40, 30], segmentation={"size": [30, 40], "counts": [0, 1200]},
                iscrowd=1),
            ann(5, 3, [10, 5, 10, 10], cat=3, segmentation=rle),                  # compressed RLE
            ann(6, 4, [10, 5, 10, 10],
                segmentation={"size": [30, 40],
                              "counts": data.rle_string_to_counts(rle["counts"])}),
            ann(7, 5, [0, 0, 20, 20], segmentation=[[1, 2, 3, 4]])]   # polygon of 2 points: skipped
    write_coco(tmp_path, images, anns)
    return tmp_path


def test_reader_handles_awkward_files(awkward):
    ds = data.CocoLayoutDataset(awkward, "train", size=40, min_area=0.0)
    assert ds.class_names == ["person", "car", "dog"]  # sorted by category id, contiguous index
    s = ds.stats
    assert (s["images"], s["crowd"], s["zero_area"], s["clipped"], s["bad_polygons"]) == (6, 1, 1, 1, 1)
    assert s["empty_images"] == 2  # image 6, and image 2 whose only objects were zero-area or crowd
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["image"].shape == (3, 40,
                                     40) and it["image"].min() >= -1 and it["image"].max() <= 1
    # grayscale -> RGB
    assert torch.allclose(items[1]["image"], torch.full((3, 40, 40), 77 / 127.5 - 1))
    red = data.from_model_range(items[4]["image"])[20, 20]
    assert red[0] > 200 and red[1] < 50 and red[2] < 50  # CMYK -> RGB
    assert data.from_model_range(items[3]["image"])[20, 20].tolist() == [0, 0, 255]  # RGBA, opaque
    assert items[0]["labels"].tolist() == [0, 2] and items[0]["ann_ids"].tolist() == [1, 2]
    # clipped
    assert torch.allclose(items[0]["boxes"][1], torch.tensor([30 / 40, 20 / 30, 1.0, 1.0]))
    assert len(items[5]["labels"]) == 0 and items[5]["masks"].shape == (0, 40, 40)
    for i in (2, 3):  # both RLE forms decode to the 10 x 10 square at x 10..19, y 5..14, stretched
                      # to 40 x 40
        m = items[i]["masks"][0]
        # rows 5..15 stretch to 6.67..20: rows 7..19 are at least half covered -> 13 rows of 10
        assert m.sum() == 13 * 10 and m[8, 12] == 1 and m[6, 12] == 0 and m[20, 12] == 0
    m = items[4]["masks"][0]  # no usable polygon: the filled box
    assert m.sum() == 20 * round(20 * 40 / 30)


def test_reader_never_writes_into_the_data_folder(awkward):
    before = {p: p.stat().st_mtime_ns for p in awkward.rglob("*")}
    ds = data.CocoLayoutDataset(awkward, "train", size=16, attributes={1: "hard"})
    [ds[i] for i in range(len(ds))]
    assert {p: p.stat().st_mtime_ns for p in awkward.rglob("*")} == before


def one_line_error(fn, *args, **kw):
    with pytest.raises(config.DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    assert "file not found" in one_line_error(data.load_coco, tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "annotations" / "instances_train.json"
    bad.write_text('{"images": [')
    assert "instances_train.json: malformed json" in one_line_error(data.CocoLayoutDataset, tmp_path)
    bad.write_text('{"images": []}')
    assert "missing or malformed 'annotations'" in one_line_error(data.CocoLayoutDataset, tmp_path)
    assert "no annotations/instances_val.json" in one_line_error(data.CocoLayoutDataset, tmp_path, "val")


def test_bad_images_and_records(tmp_path):
    im = Image.new("RGB", (8, 8))
    write_coco(tmp_path, [(1, "a.png", None, (8, 8))], [])
    assert "a.png: image file is missing" in one_line_error(data.CocoLayoutDataset, tmp_path)
    write_coco(tmp_path, [(1, "a.png", b"not a png at all", (8, 8))], [])
    assert "a.png: image will not decode" in one_line_error(data.CocoLayoutDataset, tmp_path)
    write_coco(tmp_path, [(1, "a.png", im, (9, 8))], [])
    assert "a.png: json says 9x8, the file is 8x8" in one_line_error(data.CocoLayoutDataset, tmp_path)
    write_coco(tmp_path, [(1, "a.png", im, (8, 8))], [ann(17, 1, [0, 0, 4, 4], cat=99)])
    assert "annotation 17 has unknown category_id 99" in one_line_error(data.CocoLayoutDataset, tmp_path)
    write_coco(tmp_path, [(1, "a.png", im, (8, 8))], [ann(18, 5, [0, 0, 4, 4])])
    assert "annotation 18 refers to unknown image_id 5" in one_line_error(data.CocoLayoutDataset, tmp_path)


def test_truncated_image_fails_at_load_with_its_name(tmp_path):
    buf = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3),
                                                      dtype=np.uint8)).save(buf)
    write_coco(tmp_path, [(1, "t.png", buf.read_bytes()[:200], (32, 32))], [])
    ds = data.CocoLayoutDataset(tmp_path, check_files=True)  # the header is intact
    assert "t.png: image will not decode" in one_line_error(ds.__getitem__, 0)


def test_area_filter_and_cap_keep_the_largest(tmp_path):
    im = Image.new("RGB", (100, 100))
    sides = [5, 30, 10, 20, 40, 12]  # areas 0.25%, 9%, 1%, 4%, 16%, 1.44%
    write_coco(tmp_path, [(1, "a.png", im, (100, 100))],
               [ann(i + 1, 1, [i * 2, 0, s, s]) for i, s in enumerate(sides)])
    ds = data.CocoLayoutDataset(tmp_path, size=20, min_area=0.02, max_objects=2)
    assert sorted(ds[0]["ann_ids"].tolist()) == [2, 5]  # the two largest of the three over 2%
    assert ds.stats["dropped_small"] == 3 and ds.stats["dropped_cap"] == 1


def test_resize_keeps_boxes_and_masks_together(tmp_path):
    """A box drawn on the resized image matches the resized mask, for polygons and RLE, non-square
    input."""
    W, H, S = 60, 40, 32
    img = np.zeros((H, W, 3), np.uint8)
    img[8:28, 12:42] = 255
    full = np.zeros((H, W), bool)
    full[8:28, 12:42] = True
    write_coco(tmp_path, [(1, "a.png", Image.fromarray(img), (W, H))],
               [ann(1, 1, [12, 8, 30, 20], segmentation=[[12, 8, 42, 8, 42, 28, 12, 28]]),
                ann(2, 1, [12, 8, 30, 20], segmentation=coco.mask_to_rle(full))])
    it = data.CocoLayoutDataset(tmp_path, size=S, min_area=0.0)[0]
    bright = data.from_model_range(it["image"]).mean(-1) > 127  # the resized pixels
    for k in range(2):
        m = it["masks"][k].bool().numpy()
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = (it["boxes"][k] * S).tolist()
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        assert (m != bright).sum() <= 2 * (S + S)  # at most the boundary ring differs


# ----------------------------------------------------------------------------------------------
# tokens

@pytest.mark.parametrize("bins", [32, 7, 64])
def test_token_round_trip_random_layouts(bins):
    tok = data.LayoutTokenizer(["a", "b", "c"], bins=bins, max_objects=6)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(0, 7, (1,), generator=g))
        xy = torch.rand(n, 4, generator=g)
        boxes = torch.cat([torch.minimum(xy[:, :2], xy[:, 2:]),
                           torch.maximum(xy[:, :2], xy[:, 2:])], 1)
        labels, diff = torch.randint(0, 3, (n,), generator=g), torch.randint(
            0, 3, (n,), generator=g
        )
        ids = tok.encode(boxes, labels, diff)
        assert ids.shape == (tok.seq_len,) and ids.max() < tok.vocab_size
        out = tok.decode(ids)
        assert ((out["boxes"] - boxes).abs() <= 0.5 / (bins - 1) + 1e-6).all()  # within half a bin
        assert out["labels"].tolist() == labels.tolist() and out["difficulty"].tolist() == diff.tolist()


def test_grid_index_is_geodiffusions():
    tok = data.LayoutTokenizer(["a"], bins=256, max_objects=1)
    ids = tok.encode(torch.tensor([[0.25, 0.5, 1.0, 1.0]]), torch.tensor([0]))
    # index = round(y (n-1)) n + round(x (n-1)) = round(127.5) * 256 + round(63.75) = 128 * 256 + 64
    assert ids[2] - tok.loc_offset == 128 * 256 + 64 and ids[3] - tok.loc_offset == 255 * 256 + 255
    assert tok.location_xy()[128 * 256 + 64].tolist() == pytest.approx([64 / 255, 128 / 255])


def test_render_null_budget_and_slots():
    tok = data.LayoutTokenizer(["circle", "star"], bins=16, max_objects=2)
    ids = tok.encode(torch.tensor([[0.2, 1 / 3, 0.8, 1.0]]), torch.tensor([1]), torch.tensor([2]))
    assert tok.render(ids) == "An image with star <l3,5> <l12,15> [hard]"
    assert ids.tolist() == [tok.bos_id, tok.class_offset + 1, tok.loc_offset + 5 * 16 + 3,
                            tok.loc_offset + 15 * 16 + 12, tok.diff_offset + 2, tok.eos_id, 0, 0, 0,
                            0]
    assert tok.render(tok.null_prompt()) == "<null>" and tok.decode(tok.null_prompt())["labels"].numel() == 0
    with pytest.raises(ValueError, match="exceed the token budget of 2"):
        tok.encode(torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    slots, valid = tok.object_slots(torch.stack([ids, tok.null_prompt()]))
    assert slots.shape == (2, 2, 4) and valid.tolist() == [[True, False], [False, False]]


# ----------------------------------------------------------------------------------------------
# batches

def test_pixel_range_round_trip():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    x = data.to_model_range(a)
    assert x.min() == -1 and x.max() == 1
    assert (data.from_model_range(x) == a).all()
    with pytest.raises(ValueError):
        data.to_model_range(a.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return shapes.make_shapes(tmp_path_factory.mktemp("d") / "shapes", seed=0, n_train=16, n_val=4,
                              progress=False)


def test_collate_pads_with_a_mask(tiny_shapes):
    tok = data.LayoutTokenizer(shapes.SHAPES, max_objects=8)
    ds = data.CocoLayoutDataset(tiny_shapes, size=16, tokenizer=tok,
                                attributes={1: "easy", 2: "hard"})
    b = data.collate([ds[i] for i in range(4)], max_objects=8)
    n = [len(ds[i]["labels"]) for i in range(4)]
    assert b["image"].shape == (4, 3, 16, 16) and b["masks"].shape == (4, 8, 16, 16)
    assert b["valid"].sum(1).tolist() == n and b["tokens"].shape == (4, tok.seq_len)
    assert (b["ann_ids"][~b["valid"]] == -1).all() and (b["masks"][~b["valid"]] == 0).all()
    assert b["difficulty"][0, :2].tolist() == [1, 2]  # annotation ids 1 and 2 are image 1's objects
    _, valid = tok.object_slots(b["tokens"])
    assert (valid == b["valid"]).all()  # token slot k is object k


def test_shuffled_objects_stay_with_their_masks_and_tokens(tiny_shapes):
    tok = data.LayoutTokenizer(shapes.SHAPES, max_objects=8)
    ds = data.CocoLayoutDataset(tiny_shapes, size=16, tokenizer=tok, shuffle_objects=True)
    torch.manual_seed(0)
    ref = ds.load(0)
    orders = set()
    for _ in range(20):
        it = ds[0]
        idx = [ref["ann_ids"].tolist().index(a) for a in it["ann_ids"].tolist()]
        orders.add(tuple(idx))
        assert (it["masks"].numpy() == ref["masks"][idx]).all()
        assert (tok.decode(it["tokens"])["labels"] == it["labels"]).all()
    assert len(orders) > 1 or len(ref["ann_ids"]) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_with_workers(tiny_shapes, workers):
    ds = data.CocoLayoutDataset(tiny_shapes, size=16,
                                tokenizer=data.LayoutTokenizer(shapes.SHAPES, max_objects=8))
    batches = list(data.make_loader(ds, batch_size=5, shuffle=False, num_workers=workers))
    assert len(batches) == 3 and batches[0]["masks"].shape == (5, 8, 16, 16)
    assert torch.equal(batches[1]["image"], torch.stack([ds[i]["image"] for i in range(5, 10)]))


# ----------------------------------------------------------------------------------------------
# data sets by name, commands


def test_missing_coco_subset_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    assert "python -m data_sets coco-subset --coco" in one_line_error(data.resolve_data, "coco_subset")
    # the method never builds it
    assert "python -m data_sets shapes" in one_line_error(data.resolve_data, "shapes")
    assert "no such data folder" in one_line_error(data.resolve_data, str(tmp_path / "nope"))


def test_cli_help_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_sets", *a], capture_output=True,
                                    text=True, cwd=REPO)
    h = run("--help")
    assert h.returncode == 0 and all(c in h.stdout for c in ("shapes", "coco-subset", "show"))
    r = run("show", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png"))
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_show_writes_a_grid(tiny_shapes, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "data_sets", "show", "--data", str(tiny_shapes),
                        "--n", "4",
                        "--size", "16", "--out", str(out)], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (4 * (16 * 4 + 2) + 2, 16 * 4 + 4)
    assert "objects per category" in r.stdout


def test_box_pixels_by_hand_and_the_edge_rule():
    """A 4 x 4 grid has pixel centres 1/8, 3/8, 5/8, 7/8. A pixel is in [x0, x1) x [y0, y1): a box
    whose right edge passes through a centre leaves that pixel out, its left edge takes it in; grow
    widens by whole pixels."""
    got = data.box_pixels(torch.tensor([1 / 8, 1 / 8, 5 / 8, 3 / 8]), 4)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0, 0:2] = True                      # x centres 1/8, 3/8 (5/8 on the edge: out); y 1/8 only
    assert torch.equal(got, want)
    grown = data.box_pixels(torch.tensor([0.3, 0.3, 0.45, 0.45]), 4, grow=1)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0:3, 0:3] = True                                  # [0.05, 0.7) holds 1/8, 3/8, 5/8
    assert torch.equal(grown, want)


def test_box_pixels_against_a_loop_and_boxes_that_share_an_edge():
    """Random boxes at S = 7 against a per-pixel Python loop; two boxes that meet at x = 0.5 share
    no pixel and together cover the pixels of the box that spans both."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(20, 2, generator=g) * 0.4], 1)
    got = data.box_pixels(boxes, 7)                                                    # (20, 7, 7)
    for b, m in zip(boxes.tolist(), got):
        ref = [
            [b[0] <= (j + 0.5) / 7 < b[2] and b[1] <= (i + 0.5) / 7 < b[3] for j in range(7)]
            for i in range(7)
        ]
        assert m.tolist() == ref
    left, right, both = data.box_pixels(torch.tensor([[0.1, 0.1, 0.5, 0.9], [0.5, 0.1, 0.9, 0.9],
                                                      [0.1, 0.1, 0.9, 0.9]]), 8)
    assert not (left & right).any() and torch.equal(left | right, both)



def test_flip_boxes_mirrors_the_pixels():
    """A box mirrored left-right covers the mirror image of its pixels (boxes whose edges miss the
    pixel centres), and flipping twice gives the box back."""
    boxes = torch.tensor([[0.1, 0.2, 0.45, 0.9], [0.6, 0.0, 0.95, 0.3]])
    assert torch.allclose(data.flip_boxes(boxes)[0], torch.tensor([0.55, 0.2, 0.9, 0.9]))
    assert torch.equal(data.box_pixels(data.flip_boxes(boxes), 8),
                       data.box_pixels(boxes, 8).flip(-1))
    assert torch.allclose(data.flip_boxes(data.flip_boxes(boxes)), boxes)
