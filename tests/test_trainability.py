"""experiments/trainability.py and experiments/evaluate.py's trainability part: the generated training layouts are the
training set's, drawn at random and mirrored half the time; the two protocols give the detectors the right
real images (low_data: exactly the ones the generator trained on, which the training loop indexed; paper:
the whole split), low_data refuses a generator that saw the whole split, and the mixed set's draw."""
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import config
import data
import sample
import train
from conftest import TINY_MODEL, tiny_train_cfg
from experiments import evaluate, report, trainability


def test_training_layouts_are_drawn_and_mirrored(ckpt):
    ck = torch.load(ckpt, weights_only=False)
    pool = sample.split_layouts(ck, 100, split="train")
    lays = trainability.training_layouts(ck, 40, seed=3)
    assert len(lays) == 40 and lays[0]["boxes"].equal(trainability.training_layouts(ck, 40, seed=3)[0]["boxes"])
    mirrored = 0
    for lay in lays:
        b = lay["boxes"]
        flip = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
        as_drawn = any(p["labels"].equal(lay["labels"]) and p["boxes"].allclose(b) for p in pool)
        as_mirror = any(p["labels"].equal(lay["labels"]) and p["boxes"].allclose(flip) for p in pool)
        assert as_drawn or as_mirror
        mirrored += as_mirror and not as_drawn
    assert 5 < mirrored < 35


def sources(lay, pool):
    """Positions of the pool layouts `lay` is, as drawn or mirrored."""
    b = lay["boxes"]
    flip = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], 1)
    return {i for i, p in enumerate(pool)
            if p["labels"].equal(lay["labels"]) and (p["boxes"].allclose(b) or p["boxes"].allclose(flip))}


@pytest.fixture(scope="module")
def subset_run(tiny_data, tmp_path_factory):
    """A generator trained 3 steps with --train-subset 0.5 on tiny_data (16 training images), with
    what its training loop decoded and indexed: (ckpt path, decoded image ids, batch indices)."""
    out = tmp_path_factory.mktemp("sub") / "run"
    seen = dict(ids=None, idx=[])

    class Spy(data.DecodedLayouts):
        def __init__(self, dataset, *a, **kw):
            seen["ids"] = [int(rec["image_id"]) for rec in dataset.records]
            super().__init__(dataset, *a, **kw)

        def batch(self, idx, orders=None):
            seen["idx"] += torch.as_tensor(idx).tolist()
            return super().batch(idx, orders)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.data, "DecodedLayouts", Spy)
        train.train(tiny_train_cfg(tiny_data, out, steps=3, sample_every=0, train_subset=0.5), TINY_MODEL)
    return out / "ckpt.pt", seen["ids"], seen["idx"]


def fake_opened(ck_path, tmp_path, monkeypatch, **cfg):
    """What trainability_part reads of an opened run, for the checkpoint `ck_path`, with generation
    and the detectors replaced by stand-ins that record what they are given: (R, calls)."""
    model, tok, diff, ck = sample.load_checkpoint(ck_path)
    tc = ck["train_cfg"]
    keep = dict(min_area=tc["min_area"], max_objects=tc["max_objects"])
    calls = dict(layouts=[], datasets={})
    S = tc["image_size"]

    def generate_layouts(model, diff, tok, layouts, size, **kw):
        calls["layouts"].append(layouts)
        return [np.full((S, S, 3), 128, np.uint8) for _ in layouts]

    monkeypatch.setattr(evaluate.sample, "generate_layouts", generate_layouts)
    monkeypatch.setattr(trainability.detector, "train", lambda ds, *a, **kw: ds)
    monkeypatch.setattr(trainability.coco_map, "evaluate",
                        lambda ds, val: calls["datasets"].setdefault(len(calls["datasets"]), ds)
                        and dict(mAP=0.1, AP50=0.2, AP75=0.05))
    (tmp_path / "eval").mkdir()
    R = SimpleNamespace(cfg=evaluate.EvalConfig(seeds=1, device="cpu", dtype="fp32", **cfg), M=dict(
        meta=dict(seconds={})), ck=ck, keep=keep, log=lambda m: None, out=tmp_path, tok=tok,
        root=tc["data"], path=ck_path.parent, model=model, diff=diff, gen_kw=dict(progress=False),
        stages=dict(det_size=16, det_steps=1), device="cpu",
        real_val_S=data.CocoLayoutDataset(tc["data"], "val", size=S, **keep))
    return R, calls


def image_ids(ds):
    """The image ids of a (Subset of a) CocoLayoutDataset."""
    if isinstance(ds, torch.utils.data.Subset):
        return [int(ds.dataset.records[i]["image_id"]) for i in ds.indices]
    return [int(rec["image_id"]) for rec in ds.records]


def test_low_data_uses_only_the_images_the_generator_trained_on(subset_run, tiny_data, tmp_path,
                                                                monkeypatch):
    ck_path, decoded_ids, batch_idx = subset_run
    ck = torch.load(ck_path, weights_only=False)
    ids = ck["train_image_ids"]
    split = data.CocoLayoutDataset(tiny_data, "train", size=16, max_objects=4)
    all_ids = image_ids(split)
    # the generator: 8 of the 16 images, recorded as the loop decoded them; it indexed nothing else
    assert len(ids) == 8 and set(ids) < set(all_ids) and decoded_ids == ids
    assert batch_idx and set(batch_idx) <= set(range(8))
    R, calls = fake_opened(ck_path, tmp_path, monkeypatch, protocol="low_data", gen_fractions=(1.0, 0.5))
    evaluate.trainability_part(R, None)
    T = R.M["trainability"]
    dets = list(calls["datasets"].values())                   # real first, then each generated row
    assert sorted(image_ids(dets[0])) == sorted(ids)          # the baseline: the generator's images
    for ds in dets[1:]:                                       # every row: the same real images + its set
        assert sorted(image_ids(ds.datasets[0])) == sorted(ids)
    assert T["protocol"] == "low_data" and T["real_images"] == 8 and T["real_image_ids"] == sorted(ids)
    assert T["generated_images"]["origin"] == 8 and T["generated_images"]["origin_x0.5"] == 4
    assert T["rows"]["mixed_x0.5"]["AP75"] == dict(mean=0.05, std=0.0, n=1)
    # the generated layouts come from the subset alone (drawn or mirrored)
    pool = sample.split_layouts(ck, 100, split="train")
    inside = {all_ids.index(i) for i in ids}
    for lays in calls["layouts"]:
        for lay in lays:
            assert sources(lay, pool) and sources(lay, pool) <= inside


def test_paper_protocol_trains_the_baseline_on_every_training_image(ckpt, tiny_data, tmp_path,
                                                                    monkeypatch):
    R, calls = fake_opened(ckpt, tmp_path, monkeypatch)          # protocol paper, fractions 1 and 0.5
    # a class filter that keeps every other generated all-hard image
    monkeypatch.setattr(evaluate.crops, "accept_objects",
                        lambda clf, ims, lays, p: [np.array([i % 2 == 0]) for i in range(len(ims))])
    evaluate.trainability_part(R, object())
    T, M = R.M["trainability"], R.M
    split = data.CocoLayoutDataset(tiny_data, "train", size=16, max_objects=4)
    dets = list(calls["datasets"].values())
    assert sorted(image_ids(dets[0])) == sorted(image_ids(split)) and len(dets[0]) == 16
    assert T["protocol"] == "paper" and T["real_images"] == 16 and "real_image_ids" not in T
    assert T["generated_images"]["origin"] == 16 and T["generated_images"]["hard_x0.5"] == 8
    assert len(dets) == 1 + 2 * (len(trainability.GEN_MODES) + 2)
    assert T["generated_images"]["hard_filtered"] == 8 and T["generated_images"]["hard_filtered_x0.5"] == 4
    # the filter's control: as many all-[hard] images, drawn at random from the same set
    rows = dict(zip(["real"] + list(T["generated_images"]), dets))
    filt, rand = rows["hard_filtered"].datasets[1], rows["hard_random"].datasets[1]
    assert filt.indices == list(range(0, 16, 2)) and rand.dataset is filt.dataset is rows["hard"].datasets[1].dataset
    assert rand.indices == trainability.random_subset(16, 8, R.cfg.seed + 3) != filt.indices
    assert T["generated_images"]["hard_random_x0.5"] == 4 and "train_aug_hard_random_map50" in M
    assert T["filter"]["kept"] == 8 and T["filter"]["of"] == 16
    text = "\n".join(report.experiments(R.M, {}))
    assert "Protocol paper" in text and "| real only | 16 | 0 | 0.100 +- 0.000 | 0.200 +- 0.000 |" in text
    assert "| real + hard filtered x0.5 | 16 | 4 |" in text
    assert M["train_real_map50"] == 0.2 and "train_aug_mixed_map50" in M
    assert "train_aug_mixed_x0.5_map50" not in M             # top-level keys: the first fraction's rows


def test_low_data_refuses_a_generator_that_saw_the_whole_split(ckpt, tmp_path):
    ck = torch.load(ckpt, weights_only=False)
    with pytest.raises(config.DataError) as err:
        trainability.check_protocol(ck, "low_data", ckpt)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{ckpt}: --protocol low_data")
    assert "saw all of it" in msg and "python detdiff.py --train-subset 0.1" in msg
    # a checkpoint that says --train-subset < 1 but recorded no ids is refused too
    sub = dict(ck, train_cfg=dict(ck["train_cfg"], train_subset=0.1), train_image_ids=None)
    with pytest.raises(config.DataError, match="needs the ids of the images .* recorded none"):
        trainability.check_protocol(sub, "low_data", ckpt)
    # and one that decodes through an autoencoder, which learned from the whole split
    with pytest.raises(config.DataError, match="autoencoder trained on the whole training split"):
        trainability.check_protocol(dict(sub, train_image_ids=[1, 2], autoencoder={"cfg": {}}),
                                    "low_data", ckpt)
    trainability.check_protocol(ck, "paper", ckpt)                               # the paper's is fine
    # through evaluate: refused before anything else is opened (this folder has no detector.pt)
    (tmp_path / "run").mkdir()
    shutil.copy(ckpt, tmp_path / "run" / "ckpt.pt")
    run = tmp_path / "run"
    with pytest.raises(config.DataError, match=re.escape(f"{run / 'ckpt.pt'}: --protocol low_data")):
        evaluate.evaluate(run, evaluate.EvalConfig(quick=True, device="cpu", parts="trainability",
                                                   protocol="low_data"))


def test_random_subset_is_a_seeded_draw_without_repeats():
    a = trainability.random_subset(50, 20, seed=5)
    assert a == sorted(set(a)) and len(a) == 20 and all(0 <= i < 50 for i in a)
    assert a == trainability.random_subset(50, 20, seed=5) != trainability.random_subset(50, 20, seed=6)
    assert a != list(range(20)) and trainability.random_subset(7, 7, 0) == list(range(7))


def test_mixed_draws_each_object_hard_with_probability_one_half():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 6, (400,), generator=g).tolist()
    lays = [dict(boxes=torch.rand(n, 4), labels=torch.randint(5, (n,)),
                 difficulty=torch.zeros(n, dtype=torch.long)) for n in sizes]
    a, b = trainability.mixed_difficulty(lays, seed=7), trainability.mixed_difficulty(lays, seed=7)
    codes = torch.cat([lay["difficulty"] for lay in a])
    easy, hard = data.DIFFICULTY.index("easy"), data.DIFFICULTY.index("hard")
    assert set(codes.tolist()) == {easy, hard} and len(codes) > 1000
    assert 0.45 < (codes == hard).float().mean().item() < 0.55
    assert all(x["difficulty"].equal(y["difficulty"]) for x, y in zip(a, b))      # the seed fixes it
    other = torch.cat([lay["difficulty"] for lay in trainability.mixed_difficulty(lays, seed=8)])
    assert not other.equal(codes)
    assert all(x["boxes"] is lay["boxes"] and x["labels"] is lay["labels"] for x, lay in zip(a, lays))
    assert trainability.with_mode(lays, "mixed", 7)[3]["difficulty"].equal(a[3]["difficulty"])


def test_the_new_settings_are_flags():
    import argparse
    import detdiff
    assert detdiff.parse_flags(["--train-subset", "0.1"]) == {"train_subset": 0.1}
    p = argparse.ArgumentParser()
    config.add_flags(p, evaluate.EvalConfig)
    a = p.parse_args(["--gen-fractions", "1,0.25", "--protocol", "low_data"])
    assert a.gen_fractions == (1.0, 0.25) and a.protocol == "low_data"
    with pytest.raises(config.DataError, match=r"^--train-subset must be in \(0, 1\], got 1.5$"):
        train.check_sizes(train.TrainConfig(train_subset=1.5))
    assert train.training_subset(10, 0.3, seed=1) == train.training_subset(10, 0.3, seed=1)
    assert len(train.training_subset(10, 0.3, seed=1)) == 3
    # a seeded random draw, not the first k images: seeds give different subsets
    draws = {tuple(train.training_subset(100, 0.1, seed=s)) for s in range(4)}
    assert len(draws) == 4 and tuple(range(10)) not in draws
    assert train.training_subset(4, 1.0, 0) == [0, 1, 2, 3]


def test_gen_modes_picks_the_generated_sets(ckpt, tmp_path, monkeypatch):
    R, calls = fake_opened(ckpt, tmp_path, monkeypatch, gen_modes="origin", gen_fractions=(1.0,))
    evaluate.trainability_part(R, object())          # a class filter at hand, but no hard set to filter
    T = R.M["trainability"]
    assert list(T["rows"]) == ["real", "origin"] and len(calls["layouts"]) == 1
    assert all(lay["difficulty"].equal(o["difficulty"]) for lay, o in
               zip(calls["layouts"][0], trainability.training_layouts(R.ck, 16, R.cfg.seed + 1)))
    with pytest.raises(config.DataError, match=r"^--gen-modes must be some of origin, easy, hard, mixed, "
                                               r"got 'origin,hardest'$"):
        evaluate.check_settings(evaluate.EvalConfig(gen_modes="origin,hardest", device="cpu"))
    cfg = evaluate.check_settings(evaluate.EvalConfig(gen_modes=" hard, origin,", device="cpu"))[0]
    assert cfg.gen_modes == "origin,hard"                # the sets' own order, as trainability reads it
