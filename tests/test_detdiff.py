"""detdiff.py: the main job end to end on a tiny config (every stage runs, outputs are reused,
nothing is overwritten, the perception-aware attributes reach the generator's prompts, real COCO
files and a user's detector), and the command line (--paper, unknown flags, the resume guard)."""
import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import config
import data
import detdiff
import perception
import sample
import train
import unet
from data_sets import coco
from experiments import evaluate
from perceptive import detections
from conftest import TINY_MODEL, TINY_STAGES, tiny_run_cfgs


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "run"
    summary = detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    return out, summary


def test_every_stage_writes_its_output(run):
    out, summary = run
    for f in ("detector.pt", "detector.json", "attributes.json", "attributes.png", "ckpt.pt",
              "loss.png",
              "easy_hard.png", "fidelity.json", "summary.json", "log.txt"):
        assert (out / f).is_file(), f
    assert set(summary["seconds"]) == {"data", "detector", "attributes", "generator", "grid",
                                       "total"}
    assert summary["generator"]["steps"] == 4 and summary["generator"]["finished"]
    fid = json.loads((out / "fidelity.json").read_text())
    assert fid["n_layouts"] == 4 and set(fid) >= {"real",
                                                  "generated"} and 0 <= fid["generated"]["AP50"] <= 1
    # rows real / origin / easy / hard, one column per layout (16 px tiles drawn 4x, 2 px padding)
    w, h = Image.open(out / "easy_hard.png").size
    assert (w, h) == (3 * 66 + 2, 4 * 66 + 2)


def test_attributes_reach_the_generator_prompts(run):
    out, _ = run
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["attributes_used"] == str((out / "attributes.json").resolve())
    side = perception.load_attributes(out / "attributes.json", "val")
    ds = data.CocoLayoutDataset(tiny_data_root(ck), "val", size=16, max_objects=4)
    lays = sample.split_layouts(ck, 4)
    for i, lay in enumerate(lays):                                 # "origin" = the sidecar's labels
        want = [data.DIFFICULTY.index(side[a]) for a in ds[i]["ann_ids"].tolist()]
        assert lay["difficulty"].tolist() == want and all(c in (1, 2) for c in want)


def tiny_data_root(ck):
    return ck["train_cfg"]["data"]


def test_a_second_run_reuses_every_stage(run, tiny_data):
    out, first = run
    log_before = (out / "log.txt").read_text()
    mtimes = {f: (out / f).stat().st_mtime_ns for f in ("detector.pt", "attributes.json", "ckpt.pt",
                                                        "easy_hard.png")}
    summary = detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    new_log = (out / "log.txt").read_text()[len(log_before):]
    for stage in ("detector", "attributes", "generator", "grid"):
        assert f"[{stage}] reusing" in new_log, stage
    assert mtimes == {f: (out / f).stat().st_mtime_ns for f in mtimes}
    assert summary["generator"] == first["generator"]


def test_other_settings_in_the_same_folder_are_refused(run, tiny_data):
    out, _ = run
    with pytest.raises(config.DataError,
                       match="holds a run made with other settings \\(pal_weight\\)"):
        detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES, pal_weight=0.0), TINY_MODEL)


def test_a_run_made_before_a_setting_existed_compares_it_with_its_default(run, tiny_data, tmp_path):
    out, _ = run
    saved = json.loads((out / "pipeline.json").read_text())
    (out / "pipeline.json").write_text(json.dumps({k: v for k,
                                                   v in saved.items() if k != "detector"}))
    with pytest.raises(config.DataError,
                       match="holds a run made with other settings \\(detector\\)"):
        detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES,
                                        detector=str(tmp_path / "det.pt")), TINY_MODEL)
    # the default: reused
    detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    assert json.loads((out / "pipeline.json").read_text())["detector"] == ""      # and now recorded


def test_one_stage_needs_its_inputs(tiny_data, tmp_path):
    with pytest.raises(config.DataError,
                       match="ckpt.pt: missing; run the stage that makes it first"):
        detdiff.pipeline(*tiny_run_cfgs(tiny_data, tmp_path / "r", **TINY_STAGES, stage="grid"),
                         TINY_MODEL)
    with pytest.raises(config.DataError,
                       match="--stage must be one of all, data, .*got 'sampling'"):
        detdiff.pipeline(*tiny_run_cfgs(tiny_data, tmp_path / "r", stage="sampling"), TINY_MODEL)


def test_missing_data_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^error: .*nowhere: no such data folder"):
        detdiff.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert not out.exists()


# ---- real COCO as a practitioner brings it, with an external detector's results json
# ----------------

@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """A COCO 2017-style folder with real COCO's quirks: train2017/ and val2017/ with
    instances_*2017.json, 12-digit JPEG names, non-square images, a grayscale one, non-contiguous
    category ids listed out of order (one with no objects), a crowd region, polygon and RLE masks,
    an image without annotations. Beside it a results json of "another detector" that finds every
    object but each third one (those must come out [hard])."""
    root = tmp_path_factory.mktemp("c") / "coco"
    cats = [dict(id=18, name="dog"), dict(id=1, name="person"), dict(id=3, name="car"),
            dict(id=90, name="toothbrush")]
    colours = {18: (230, 40, 40), 1: (40, 230, 40), 3: (40, 40, 230)}
    rng = np.random.default_rng(0)
    results, missed, n = [], set(), 0
    for split, n_images, first_id in (("train", 12, 100), ("val", 4, 900)):
        (root / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for k in range(n_images):
            image_id, W, H = first_id + k, 64, 48
            im = Image.new("RGB", (W, H), tuple(int(v) for v in rng.integers(90, 160, 3)))
            draw = ImageDraw.Draw(im)
            for j in range(0 if k == 3 else 2):                      # image 3 has no annotations
                cid = (18, 1, 3)[(k + j) % 3]
                x, y = 4 + 30 * j, int(rng.integers(2, 14))
                w, h = 24, int(rng.integers(16, 30))
                draw.ellipse([x, y, x + w - 1, y + h - 1], fill=colours[cid])
                n += 1
                a = dict(id=1000 * image_id + j, image_id=image_id, category_id=cid,
                         bbox=[x, y, w, h], iscrowd=0,
                         area=w * h * 0.78, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
                if j == 1:                              # a compressed RLE mask instead of a polygon
                    m = np.zeros((H, W), bool)
                    m[y:y + h, x:x + w] = True
                    a["segmentation"] = coco.mask_to_rle(m)
                anns.append(a)
                if n % 3:
                    results.append(dict(image_id=image_id, category_id=cid, score=0.8,
                                        bbox=[x + 1, y, w - 1, h]))         # IoU > 0.9 with the box
                else:
                    missed.add(a["id"])
            if k == 5:                                               # a crowd region: not an object
                anns.append(dict(id=1000 * image_id + 9, image_id=image_id, category_id=1,
                                 bbox=[0, 0, W, H],
                                 iscrowd=1, area=W * H,
                                 segmentation={"size": [H, W], "counts": [0, W * H]}))
            if k == 7:
                im = im.convert("L")                                     # a grayscale JPEG
            name = f"{image_id:012d}.jpg"
            im.save(root / f"{split}2017" / name, quality=95)
            images.append(dict(id=image_id, file_name=name, width=W, height=H))
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(dict(images=images, annotations=anns, categories=cats)))
    (root.parent / "dets.json").write_text(json.dumps(results))
    return root, root.parent / "dets.json", missed


def test_the_main_job_on_real_coco_files_with_an_external_detectors_results(
    coco_like, tmp_path, monkeypatch
):
    root, dets, missed = coco_like
    out = tmp_path / "run"
    summary = detdiff.pipeline(*tiny_run_cfgs(str(root), out, **TINY_STAGES, detector=str(dets)),
                               TINY_MODEL)
    assert summary["data"]["classes"] == ["person", "car", "dog", "toothbrush"]    # by category id
    assert not (out / "detector.pt").exists()                         # nothing trained in its place
    det = json.loads((out / "detector.json").read_text())
    assert det["source"] == f"COCO results json {dets}" and 0 < det["AP50"] < 1
    side = json.loads((out / "attributes.json").read_text())
    for split in ("train", "val"):                # the results decide easy / hard, object by object
        got = side["attributes"][split]
        assert got and {int(a) for a,
                        d in got.items() if d == "hard"} == {int(a) for a in got} & missed
    fid = json.loads((out / "fidelity.json").read_text())
    # it has not seen generated images
    assert "generated" not in fid and "is a results json" in fid["note"]
    text = detdiff.summary_text(summary)
    assert f"(given: COCO results json {dets})" in text and "fidelity   no fidelity score" in text
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["pipeline_cfg"]["detector"] == str(dets) and ck["tokenizer"]["category_ids"] == [1, 3, 18, 90]
    assert "detector" not in ck["train_cfg"]            # the generator's settings hold only its own
    with pytest.raises(config.DataError, match="a results json cannot score generated images"):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity"))
    asked = []                                 # --evaluate runs every part a results json can serve
    monkeypatch.setattr(evaluate, "evaluate", lambda run, cfg: asked.append(cfg.parts))
    detdiff.pipeline(*tiny_run_cfgs(str(root), out, **TINY_STAGES, detector=str(dets),
                                    evaluate=True), TINY_MODEL)
    assert asked == ["fid,crops,trainability,masks"]


def test_a_results_json_of_another_data_set_stops_before_anything_is_trained(coco_like, tmp_path):
    root, dets, _ = coco_like
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps([dict(image_id=100, category_id=44, bbox=[0, 0, 5, 5], score=0.9)]))
    out = tmp_path / "run"
    with pytest.raises(SystemExit,
                       match=r"^error: .*other.json: category_id 44 of the results are not the "
                             r"data set's"):
        detdiff.main(["--data", str(root), "--out", str(out), "--detector", str(bad)])
    assert not (out / "ckpt.pt").exists() and not (out / "detector.json").exists()


def test_the_main_job_with_a_torchvision_detector_mapped_to_its_classes(
    tiny_data, tmp_path, monkeypatch
):
    # an untrained COCO-shaped torchvision model stands in for the user's weights file: it finds no
    # shape, so the attribute is degenerate and the log and the summary say so and how to fix it
    from torchvision.models import detection
    torch.manual_seed(0)
    net = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                  num_classes=91)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    flags = dict(detector="torchvision:ssdlite320_mobilenet_v3_large",
                 detector_weights=str(tmp_path / "w.pth"))
    with pytest.raises(SystemExit,
                       match=r"^error: .*no class 'circle'.*--detector-classes circle=<its class>"):
        detdiff.main(["--data", tiny_data, "--out", str(tmp_path / "r0"), "--detector",
                      flags["detector"],
                      "--detector-weights", flags["detector_weights"]])
    out = tmp_path / "run"
    cmap = "circle=person,square=car,triangle=dog,cross=cat,star=bird"
    monkeypatch.chdir(tmp_path)           # a relative weights path is kept absolute for experiments/evaluate.py
    flags["detector_weights"] = "w.pth"
    sides, predict = [], detections.TorchvisionDetector.predict

    def recording(self, images, *a, **kw):
        sides.append(tuple(images.shape[-2:]))
        return predict(self, images, *a, **kw)
    monkeypatch.setattr(detections.TorchvisionDetector, "predict", recording)
    # --det-size 8 below the data's 16 px: the torchvision detector sees 16 px images (attributes,
    # its val score, fidelity on real and generated images), and the log says why
    summary = detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **dict(TINY_STAGES, det_size=8), **flags,
                                              detector_classes=cmap), TINY_MODEL)
    assert sides and set(sides) == {(16, 16)}
    assert "the given detector sees images at 16 px" in (out / "log.txt").read_text()
    sides.clear()                                  # experiments/evaluate.py's fidelity: the same side
    evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity"))
    assert sides and set(sides) == {(16, 16)}
    assert json.loads((out / "pipeline.json").read_text())["detector_weights"] == str(tmp_path / "w.pth")
    assert not (out / "detector.pt").exists()
    assert "torchvision ssdlite320_mobilenet_v3_large" in json.loads((out / "detector.json").read_text())["source"]
    fid = json.loads((out / "fidelity.json").read_text())
    # it scores generated images
    assert 0 <= fid["generated"]["AP50"] <= 1 and 0 <= fid["real"]["AP50"] <= 1
    a = summary["attributes"]
    assert a["hard_fraction"] > 0.9 and a["warning"].startswith(f"warning: {100 * a['hard_fraction']:.1f}% of the")
    assert a["warning"] in detdiff.summary_text(summary) and a["warning"] in (out / "log.txt").read_text()


# ---- the command line
# --------------------------------------------------------------------------------------------


def test_paper_flag_sets_the_papers_settings_under_explicit_flags():
    """--paper: token conditioning, lambda 0.01, plain L_simple on the linear schedule, no
    attribute-only dropout, AdamW (each differs from the defaults); a flag given beside it wins;
    without it nothing is added."""
    t, p, m = detdiff.split_args(detdiff.parse_flags(["--paper", "--schedule", "cosine"]))
    assert m == {"cond": "tokens"} and p == {}
    assert t == {"pal_weight": 0.01, "loss_weight": "none", "fg_reweight": False,
                 "schedule": "cosine",
                 "p_uncond_attr": 0.0, "optimizer": "adamw"}
    t, _, m = detdiff.split_args(detdiff.parse_flags(["--paper"]))
    assert t["schedule"] == "linear" and not t["fg_reweight"]
    defaults = {**vars(train.TrainConfig()), **vars(unet.UNetConfig())}
    assert all(defaults[k] != v for k, v in detdiff.PAPER_SETTINGS.items())
    assert detdiff.parse_flags(["--lr", "0.5"]) == {"lr": 0.5}


def test_cli_unknown_key_and_resume_guard(tiny_data, tmp_path):
    with pytest.raises(SystemExit):
        detdiff.build_parser().parse_args(["--no-such-flag", "1"])
    with pytest.raises(ValueError, match="unknown config keys"):
        detdiff.split_args({"lr": 1.0, "bogus": 2})
    args = vars(detdiff.build_parser().parse_args(["--steps", "3", "--channel-mults", "1,2",
                                                   "--no-compile"]))
    assert args == {"steps": 3, "channel_mults": (1, 2), "compile": False}
    out = tmp_path / "c"
    detdiff.main(["--data", tiny_data, "--out", str(out), "--stage", "generator", "--steps", "1",
                  "--batch-size", "2", "--image-size", "16",
                  "--timesteps", "20", "--sample-every", "0", "--sample-steps", "2", "--n-grid",
                  "1", "--dtype", "fp32",
                  "--base-channels", "8", "--channel-mults", "1,2", "--d-model", "16",
                  "--enc-layers", "1"])
    with pytest.raises(SystemExit,
                       match="^error: --resume keeps the run's saved settings; these differ: "
                             "\\['lr'\\]"):
        detdiff.main(["--out", str(out), "--resume", "--lr", "0.5"])
    # a stage's setting too
    with pytest.raises(SystemExit, match="these differ: \\['det_steps'\\]"):
        detdiff.main(["--out", str(out), "--resume", "--det-steps", "5"])
    detdiff.main(["--out", str(out), "--resume", "--steps", "2"])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2
    # a new run without --optimizer trains with today's default, Muon
    assert ck["train_cfg"]["optimizer"] == "muon" and ck["opt"]["param_groups"][0]["muon"]


def test_a_checkpoint_from_before_the_optimizer_flag_resumes_with_adamw(tiny_data, tmp_path):
    """Such a checkpoint trained with AdamW and does not name it: --resume keeps AdamW, and asking for
    Muon is refused in one line instead of failing inside torch."""
    out = tmp_path / "old"
    detdiff.main(["--data", tiny_data, "--out", str(out), "--stage", "generator", "--steps", "1",
                  "--batch-size", "2", "--image-size", "16", "--timesteps", "20", "--sample-every",
                  "0", "--sample-steps", "2", "--n-grid", "1", "--dtype", "fp32", "--base-channels",
                  "8", "--channel-mults", "1,2", "--d-model", "16", "--enc-layers", "1",
                  "--optimizer", "adamw"])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    del ck["train_cfg"]["optimizer"]                                 # as checkpoints before the flag
    torch.save(ck, out / "ckpt.pt")
    with pytest.raises(SystemExit, match="these differ: \\['optimizer'\\]"):
        detdiff.main(["--out", str(out), "--resume", "--steps", "2", "--optimizer", "muon"])
    detdiff.main(["--out", str(out), "--resume", "--steps", "2"])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2 and ck["train_cfg"]["optimizer"] == "adamw"
    with pytest.raises(config.DataError, match="--optimizer muon: the checkpoint was trained with adamw"):
        train.train(train.TrainConfig(**dict(ck["train_cfg"], optimizer="muon", resume=True, steps=3)))


# ---- settings that fail before anything runs
# --------------------------------------------------------------------

@pytest.mark.parametrize("flag, bad",
                         [("--cond", "paints"), ("--schedule", "cos"), ("--loss-weight", "snr"),
                                       ("--dtype", "float32"), ("--space", "latents"),
                                       ("--stage", "train")])
def test_a_string_setting_outside_its_choices_is_refused_by_the_parser(capsys, flag, bad):
    with pytest.raises(SystemExit):
        detdiff.build_parser().parse_args([flag, bad])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: invalid choice: '{bad}'" in err


def test_the_main_job_checks_sizes_before_any_stage_writes(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(config.DataError):
        detdiff.pipeline(train.TrainConfig(data=tiny_data, out=str(out), image_size=30))
    assert not out.exists()


def test_flags_split_into_the_generators_the_stages_and_the_models_settings():
    """Every flag lands in exactly one of TrainConfig, PipelineConfig, UNetConfig, and the main
    job's stage settings are not the generator's: the checkpoint's train_cfg holds only what
    train.py reads."""
    t, p, m = detdiff.split_args(detdiff.parse_flags(["--lr", "0.5", "--det-steps", "7", "--stage",
                                                      "grid",
                                                      "--base-channels", "8", "--n-eval", "3"]))
    assert (t, p, m) == ({"lr": 0.5}, {"det_steps": 7, "stage": "grid", "n_eval": 3},
                         {"base_channels": 8})
    gen, stages = ({f.name for f in fields(c)} for c in (train.TrainConfig, detdiff.PipelineConfig))
    assert not gen & stages and {"det_size", "gamma", "beta", "evaluate", "stage"} <= stages


@pytest.mark.parametrize("cls, field, bad", [(train.TrainConfig, "space", "latents"),
                                             (train.TrainConfig, "loss_weight", "snr"),
                                             (detdiff.PipelineConfig, "stage", "train")])
def test_settings_built_in_code_are_checked_against_their_choices(cls, field, bad):
    with pytest.raises(config.DataError,
                       match=f"^--{field.replace('_', '-')} must be one of .*got '{bad}'$"):
        config.check_choices(cls(**{field: bad}))


# ---- one budget for the whole main job
# ---------------------------------------------------------------------------


def test_minutes_bound_the_whole_job_and_the_generator_gets_what_is_left(
    tiny_data, tmp_path, monkeypatch
):
    """With --stage all, --minutes is the whole job's: the generator's budget is what the stages
    before it and the grid stage (its measured estimate, fixed here at 6 s) leave; the checkpoint
    records that budget."""
    monkeypatch.setattr(detdiff, "grid_seconds", lambda r, m: 6.0)
    out = tmp_path / "run"
    detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES, minutes=1.0, steps=2),
                     TINY_MODEL)
    seconds = json.loads((out / "summary.json").read_text())["seconds"]
    # the stages before the generator
    spent = seconds["data"] + seconds["detector"] + seconds["attributes"]
    gen_minutes = torch.load(out / "ckpt.pt", weights_only=False)["train_cfg"]["minutes"]
    assert 60 * gen_minutes == pytest.approx(60 - 6 - spent, abs=1.0)
    assert "[budget] 1 min in all: " in (out / "log.txt").read_text()


def test_a_budget_that_leaves_the_generator_nothing_is_refused(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(detdiff, "grid_seconds", lambda r, m: 50.0)
    with pytest.raises(config.DataError,
                       match=r"^--minutes 0.5: the stages before the generator took \d+ s and the "
                                             r"grid stage needs about 50 s, which leaves -?\d+ s "
                                             r"to train; give more"):
        detdiff.pipeline(*tiny_run_cfgs(tiny_data, tmp_path / "r", **TINY_STAGES, minutes=0.5,
                                        steps=2), TINY_MODEL)


def test_the_grid_estimate_is_the_measured_sampling_scaled_to_the_stage(
    tiny_data, tmp_path, monkeypatch
):
    """grid_seconds times sample.generate on 32 layouts (a warm-up step, then 2 timed steps) and
    scales the time per image-step to (n_eval + 2 n_grid) images x sample_steps, plus 10 s."""
    calls, clock = [], iter([100.0, 100.0 + 0.64])          # 0.64 s for 2 steps of 4 layouts
                                                            # (tiny_data has 4)
    monkeypatch.setattr(detdiff.sample, "generate", lambda *a, steps,
                        **k: calls.append((a[2].shape[0], steps)))
    monkeypatch.setattr(detdiff.time, "time", lambda: next(clock))
    cfg, pcfg = tiny_run_cfgs(tiny_data, tmp_path / "r", **TINY_STAGES)
    r = detdiff.Run(cfg, pcfg, tmp_path / "r", data.resolve_data(tiny_data), torch.device("cpu"),
                    "fp32",
                    log=print, stages={"grid"})
    r.train_ds = r.val_ds = data.CocoLayoutDataset(r.root, "val", size=32)
    got = detdiff.grid_seconds(r, TINY_MODEL)
    assert calls == [(4, 1), (4, 2)]
    per_image_step = 0.64 / (2 * 4)
    assert got == pytest.approx(
        (pcfg.n_eval + 2 * cfg.n_grid) * cfg.sample_steps * per_image_step + 10.0
    )
