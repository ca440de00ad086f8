"""The main job of detdiff.py end to end on a tiny config: every stage runs, outputs are reused, nothing is
overwritten, and the perception-aware attributes reach the generator's prompts."""
import json

import pytest
import torch
from PIL import Image

import data
import detdiff
import perception
import sample
from conftest import TINY_MODEL, tiny_train_cfg

TINY_STAGES = dict(det_steps=6, det_size=32, attr_steps=3, attr_folds=2, n_eval=4, n_grid=3)


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "run"
    summary = detdiff.pipeline(tiny_train_cfg(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    return out, summary


def test_every_stage_writes_its_output(run):
    out, summary = run
    for f in ("detector.pt", "detector.json", "attributes.json", "attributes.png", "ckpt.pt", "loss.png",
              "easy_hard.png", "fidelity.json", "summary.json", "log.txt"):
        assert (out / f).is_file(), f
    assert set(summary["seconds"]) == {"data", "detector", "attributes", "generator", "grid", "total"}
    assert summary["generator"]["steps"] == 4 and summary["generator"]["finished"]
    fid = json.loads((out / "fidelity.json").read_text())
    assert fid["n_layouts"] == 4 and set(fid) >= {"real", "generated"} and 0 <= fid["generated"]["AP50"] <= 1
    # rows real / origin / easy / hard, one column per layout (16 px tiles drawn 4x, 2 px padding)
    w, h = Image.open(out / "easy_hard.png").size
    assert (w, h) == (3 * 66 + 2, 4 * 66 + 2)


def test_attributes_reach_the_generator_prompts(run):
    out, _ = run
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["attributes_used"] == str((out / "attributes.json").resolve())
    side = perception.load_attributes(out / "attributes.json", "val")
    ds = data.CocoLayoutDataset(tiny_data_root(ck), "val", size=16, max_objects=4)
    lays = sample.val_layouts(ck, 4)
    for i, lay in enumerate(lays):                                         # "origin" = the sidecar's labels
        want = [data.DIFFICULTY.index(side[a]) for a in ds[i]["ann_ids"].tolist()]
        assert lay["difficulty"].tolist() == want and all(c in (1, 2) for c in want)


def tiny_data_root(ck):
    return ck["train_cfg"]["data"]


def test_a_second_run_reuses_every_stage(run, tiny_data):
    out, first = run
    log_before = (out / "log.txt").read_text()
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ("detector.pt", "attributes.json", "ckpt.pt", "easy_hard.png")}
    summary = detdiff.pipeline(tiny_train_cfg(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    new_log = (out / "log.txt").read_text()[len(log_before):]
    for stage in ("detector", "attributes", "generator", "grid"):
        assert f"[{stage}] reusing" in new_log, stage
    assert mtimes == {f: (out / f).stat().st_mtime_ns for f in mtimes}
    assert summary["generator"] == first["generator"]


def test_other_settings_in_the_same_folder_are_refused(run, tiny_data):
    out, _ = run
    with pytest.raises(SystemExit, match="holds a run made with other settings \\(pal_weight\\)"):
        detdiff.pipeline(tiny_train_cfg(tiny_data, out, **TINY_STAGES, pal_weight=0.0), TINY_MODEL)


def test_one_stage_needs_its_inputs(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="ckpt.pt: missing; run the stage that makes it first"):
        detdiff.pipeline(tiny_train_cfg(tiny_data, tmp_path / "r", **TINY_STAGES, stage="grid"), TINY_MODEL)
    with pytest.raises(SystemExit, match="--stage must be all or one of"):
        detdiff.pipeline(tiny_train_cfg(tiny_data, tmp_path / "r", stage="sampling"), TINY_MODEL)


def test_missing_data_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^error: .*nowhere: no such data folder"):
        detdiff.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert not out.exists()
