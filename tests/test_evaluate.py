"""experiments/evaluate.py: the report on a tiny finished run (every key of metrics.json, the numbers in
report.md), detector AP through the COCO round trip against hand-made detections, the ablation
generators, bad input. The parts' own modules have their own test files (test_fid.py, test_crops.py,
test_masks.py, test_trainability.py, test_ablations.py, test_report.py)."""
import json
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import detdiff
from experiments import ablations, evaluate, trainability
from conftest import TINY_MODEL, TINY_STAGES, tiny_run_cfgs

KEYS = ("real_map", "real_map50", "fidelity_map", "fidelity_map50", "fidelity_map75", "fid",
        "easy_ap50",
        "origin_ap50", "hard_ap50", "train_real_map50", "train_aug_origin_map50",
        "train_aug_hard_map50",
        "train_aug_easy_map50", "train_aug_mixed_map50", "crop_acc_easy", "crop_acc_hard")


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("e") / "run"
    detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES), TINY_MODEL)
    cfg = evaluate.EvalConfig(quick=True, ablations=True, inception=str(out / "no_inception.pt"),
                              crop_size=8)
    return out, evaluate.evaluate(out, cfg)


def test_every_key_is_in_metrics_json(run):
    out, M = run
    saved = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert k in saved, k
    # skipped, and why
    assert saved["fid"] is None and "no_inception.pt" in saved["meta"]["notes"]["fid"]
    assert set(saved["meta"]["seconds"]) >= {"fidelity", "fid", "crops", "trainability",
                                             "ablations", "total"}
    assert saved["meta"]["n_layouts"] == 4                                      # the tiny val split
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    tc = ck["train_cfg"]
    assert saved["meta"]["generator"] == dict(seed=tc["seed"], pal_weight=tc["pal_weight"],
                                              attributes=tc["attributes"], cond="paint",
                                              train_subset=tc["train_subset"], dtype=ck["dtype"])
    assert ck["dtype"] in ("fp32", "bf16", "fp16")                      # resolved, never "auto"
    T = saved["trainability"]
    # the paper's protocol: every one of the 16 training images, + 8 generated per set (quick: 0.5)
    assert T["seeds"] == 1 and T["real_images"] == 16 and len(T["runs"]["real"]) == 1
    assert T["protocol"] == "paper" and T["generated_images"]["mixed"] == 8
    assert set(T["rows"]["origin"]) == {"real_images", "generated_images", "mAP", "AP50", "AP75"}
    assert set(saved["ablations"]) == {"both on", "loss off", "attribute off", "both off",
                                       "lambda 0.01", "lambda 1"}
    assert saved["ablations"]["loss off"]["pal_weight"] == 0 and not saved["ablations"]["both off"]["attributes"]
    assert saved["meta"]["attr_guidance"] != 1 and 0 <= saved["ablations"]["lambda 1"]["fidelity_map50_plain"] <= 1
    # no attribute: w_d 1 is the row
    assert saved["ablations"]["attribute off"]["fidelity_map50_plain"] is None
    for k in ("fidelity_map50", "easy_ap50", "crop_acc_hard", "train_aug_hard_map50"):
        assert 0 <= saved[k] <= 1


def test_report_shows_the_measured_numbers(run):
    out, M = run
    text = (out / "report.md").read_text()
    for head in ("1. Layout fidelity", "2. FID", "3. Easy vs hard", "4. Trainability",
                 "5. Ablations",
                 "6. Class consistency", "The paper's claims on this run"):
        assert head in text, head
    assert f"| generated | 4 | {M['fidelity_map']:.3f} | {M['fidelity_map50']:.3f} |" in text
    assert "FID - (skipped: no file at" in text
    assert (out / "easy_hard_eval.png").is_file() and "easy_hard_eval.png" in text
    # a row of 8 per generated set, each tile the image at 4x with its boxes
    sets = [m for m in M["trainability"]["runs"] if m in trainability.GEN_MODES]
    assert M["trainability"]["figure"]["rows"] == sets
    S = torch.load(out / "ckpt.pt", weights_only=False)["train_cfg"]["image_size"]
    assert Image.open(out / "trainability_sets.png").size == (8 * (4 * S + 2) + 2, len(sets) * (4 * S + 2) + 2)
    assert len(sets) == 4 and "](trainability_sets.png)" in text and "(origin, easy, hard, mixed)" in text
    assert (out / "eval" / "crop_classifier.pt").is_file()


def test_ablation_runs_record_their_settings(run):
    out, M = run
    ck = torch.load(out / "ablations" / "attribute_off" / "ckpt.pt", weights_only=False)
    assert ck["train_cfg"]["attributes"] == "none" and ck["attributes_used"] == ""
    ck = torch.load(out / "ablations" / "lambda_1" / "ckpt.pt", weights_only=False)
    assert ck["train_cfg"]["pal_weight"] == 1.0
    assert ck["attributes_used"] == str((out / "attributes.json").resolve())


def test_a_later_part_keeps_the_earlier_ones(run):
    out, first = run
    evaluate.evaluate(out,
                      evaluate.EvalConfig(quick=True, parts="fidelity",
                                          inception=str(out / "none.pt")))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["train_real_map50"] == first["train_real_map50"] and "ablations" in saved
    assert saved["fidelity_map50"] == first["fidelity_map50"]   # same seed, same images, same score


def test_an_evaluation_cut_off_part_way_keeps_the_parts_it_finished(run, tmp_path, monkeypatch):
    out, first = run
    scores = tmp_path / "scores"

    def cut_off(R, clf):
        raise KeyboardInterrupt                          # as a session that ends mid-trainability
    monkeypatch.setattr(evaluate, "trainability_part", cut_off)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity,crops,trainability",
                                                   out=str(scores)))
    saved = json.loads((scores / "metrics.json").read_text())
    assert saved["fidelity_map50"] == first["fidelity_map50"]     # same seed, same images
    assert saved["crop_acc_real"] == first["crop_acc_real"]
    assert "train_real_map50" not in saved and saved["meta"]["parts_left"] == ["trainability"]
    assert "**Unfinished**: written before trainability ran" in (scores / "report.md").read_text()
    monkeypatch.undo()
    done = evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity", out=str(scores)))
    assert "parts_left" not in done["meta"] and "crop_acc_real" in done       # the earlier part stays
    assert "Unfinished" not in (scores / "report.md").read_text()


class BoxDetector(torch.nn.Module):
    """Detects the given boxes (normalised xyxy, one label each, score 0.9) in every image."""
    def __init__(self, boxes, labels):
        super().__init__()
        self.boxes, self.labels = torch.tensor(boxes), torch.tensor(labels)

    def predict(self, images, score_threshold=0.01, max_dets=100):
        return [dict(boxes=self.boxes, scores=torch.full((len(self.labels),), 0.9),
                     labels=self.labels)
                for _ in images]


def test_out_leaves_the_run_folder_as_it_is_and_a_kept_crop_classifier_is_used(run, tmp_path):
    out, first = run
    folder, report_dir = tmp_path / "kept", tmp_path / "report"
    shutil.copytree(out, folder)
    # as checkpoints/shapes
    shutil.copyfile(out / "eval" / "crop_classifier.pt", folder / "crop_classifier.pt")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    M = evaluate.evaluate(folder,
                          evaluate.EvalConfig(quick=True, parts="crops", out=str(report_dir)))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before    # nothing written there
    assert (report_dir / "metrics.json").is_file() and (report_dir / "report.md").is_file()
    assert not (report_dir / "eval" / "crop_classifier.pt").exists()             # not trained again
    assert f"[crops] the crop classifier {folder / 'crop_classifier.pt'}" in (report_dir / "log.txt").read_text()
    assert M["crop_acc_real"] == first["crop_acc_real"]          # the same classifier on the same
                                                                 # real crops


def test_detector_ap_against_hand_made_detections(tmp_path):
    images = [np.zeros((32, 32, 3), np.uint8)] * 3
    lay = dict(boxes=torch.tensor([[0.25, 0.25, 0.75, 0.75]]), labels=torch.tensor([1]),
               difficulty=torch.tensor([0]))
    kw = dict(names=["a", "b"], ids=[1, 2], det_size=32, max_objects=4)
    hit = evaluate.detector_ap(BoxDetector([[0.25, 0.25, 0.75, 0.75]], [1]), images, [lay] * 3,
                               folder=tmp_path / "x", **kw)
    assert hit == dict(mAP=1.0, AP50=1.0, AP75=1.0)
    # IoU of [8, 8, 24, 24] and [8, 8, 24, 20.5]: 16 * 12.5 / (16 * 16) = 0.78 -> a hit at 0.50:0.75
    # (6 of the 10 thresholds), a miss from 0.80 on
    near = evaluate.detector_ap(BoxDetector([[0.25, 0.25, 0.75, 0.640625]], [1]), images, [lay] * 3,
                                folder=tmp_path / "x", **kw)
    assert near["AP50"] == 1.0 and near["AP75"] == 1.0 and near["mAP"] == pytest.approx(0.6)
    wrong = evaluate.detector_ap(BoxDetector([[0.25, 0.25, 0.75, 0.75]], [0]), images, [lay] * 3,
                                 folder=tmp_path / "x", **kw)
    assert wrong["AP50"] == 0.0


# --------------------------------------------------------------------------------------------------
# Bad input: a one-line config.DataError naming the setting or the file, before anything heavy runs

def test_bad_settings_are_named_before_the_run_is_opened(tmp_path):
    # tmp_path is no run folder: the settings are checked first
    with pytest.raises(config.DataError,
                       match=r"^--parts: unknown fidelty \(choose from fidelity, easy_hard, fid,"):
        evaluate.evaluate(tmp_path, evaluate.EvalConfig(parts="fidelity,fidelty"))
    with pytest.raises(config.DataError,
                       match=r"^--sampler must be one of ddim, ddpm, dpm\+\+2m, got 'dpm'$"):
        evaluate.evaluate(tmp_path, evaluate.EvalConfig(sampler="dpm"))
    with pytest.raises(config.DataError,
                       match=r"^--dtype must be auto, fp32, bf16 or fp16, got 'fp8'$"):
        evaluate.check_settings(evaluate.EvalConfig(dtype="fp8"))
    assert list(tmp_path.iterdir()) == []                                      # nothing written


def test_a_folder_without_ckpt_pt_is_named(tmp_path):
    with pytest.raises(config.DataError,
                       match=re.escape(f"{tmp_path / 'ckpt.pt'}: missing; evaluate a finished")):
        evaluate.evaluate(tmp_path)


def run_folder(ckpt, tmp_path, **stages):
    """A run folder in tmp_path holding only a copy of the tiny generator checkpoint, with the main
    job's stage settings (PipelineConfig's defaults, `stages` over them)."""
    ck = torch.load(ckpt, weights_only=False)
    ck["pipeline_cfg"] = {**asdict(detdiff.PipelineConfig()), **stages}
    (tmp_path / "run").mkdir()
    torch.save(ck, tmp_path / "run" / "ckpt.pt")
    return tmp_path / "run"


def test_a_checkpoint_without_stage_settings_is_named(ckpt, tmp_path):
    """train.py alone (no main job) writes no detector settings: evaluate says so instead of a
    KeyError."""
    out = tmp_path / "bare"
    out.mkdir()
    shutil.copy(ckpt, out / "ckpt.pt")
    with pytest.raises(config.DataError, match="no detector settings .*python detdiff.py"):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, device="cpu"))


def test_a_run_without_detector_pt_is_named(ckpt, tmp_path):
    out = run_folder(ckpt, tmp_path)
    with pytest.raises(config.DataError,
                       match=re.escape(f"{out / 'detector.pt'}: missing; evaluate a finished")):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, device="cpu"))


def test_a_results_json_detector_cannot_score_generated_images(ckpt, tmp_path):
    dets = tmp_path / "dets.json"
    dets.write_text("[]")                                     # a valid (empty) COCO results json
    out = run_folder(ckpt, tmp_path, detector=str(dets))
    with pytest.raises(config.DataError,
                       match=re.escape(f"{dets}: a results json cannot score generated images "
                                                       "(fidelity, easy_hard); pass --parts fid or "
                                                       "train")):
        evaluate.evaluate(out,
                          evaluate.EvalConfig(quick=True, device="cpu",
                                              parts="fidelity,easy_hard,fid"))
    with pytest.raises(config.DataError,
                       match=re.escape(f"{dets}: a results json cannot score generated images "
                                                       "(ablations); pass --parts crops or train")):
        evaluate.evaluate(out,
                          evaluate.EvalConfig(quick=True, device="cpu", parts="crops",
                                              ablations=True))


def test_val_objects_that_no_longer_match_the_layouts_are_named(
    ckpt, tiny_data, tmp_path, monkeypatch
):
    # the layouts the run reads are nudged (as if the data set changed under it): the masks part
    # names the json
    dets = tmp_path / "dets.json"
    dets.write_text("[]")                                   # a detector the masks part does not use
    out = run_folder(ckpt, tmp_path, detector=str(dets))
    split_layouts = evaluate.sample.split_layouts
    monkeypatch.setattr(evaluate.sample, "split_layouts",
                        lambda ck,
                        n: [dict(lay, boxes=lay["boxes"] * 0.5) for lay in split_layouts(ck, n)])
    json_path = Path(tiny_data) / "annotations" / "instances_val.json"
    with pytest.raises(config.DataError,
                       match=re.escape(f"{json_path}: the val objects no longer match the layouts")):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, device="cpu", parts="masks"))


def test_the_command_line_says_a_data_error_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--run", str(tmp_path),
                        "--device", "cpu"],
                       capture_output=True, text=True, cwd=Path(evaluate.__file__).parents[1])
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {tmp_path / 'ckpt.pt'}: missing; evaluate a finished "
                                     f"`python detdiff.py` run folder"]


def test_main_job_switch_runs_the_evaluation(run, tiny_data, monkeypatch):
    out, _ = run
    called = []
    monkeypatch.setattr(evaluate, "evaluate", lambda r,
                        cfg=None: called.append(str(r)) or {"fid": None})
    summary = detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES, evaluate=True),
                               TINY_MODEL)
    assert called == [str(out)] and summary["evaluate"] == {"fid": None}
    detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, **TINY_STAGES), TINY_MODEL)   # off by default
    assert called == [str(out)]


def test_noise_seeds_give_per_seed_ap50s_their_mean_and_spread(run):
    out, _ = run
    cfg = evaluate.EvalConfig(quick=True, parts="easy_hard", noise_seeds=2, attr_guidance=2.0)
    M = evaluate.evaluate(out, cfg)
    E = M["easy_hard"]
    assert E["noise_seeds"] == [0, 1] and len(E["ap50"]) == 2 and M["meta"]["attr_guidance"] == 2.0
    for m in ("easy", "origin", "hard"):
        assert M[f"{m}_ap50"] == pytest.approx(sum(a[m] for a in E["ap50"]) / 2, abs=1e-4)
    d = [a["easy"] - a["hard"] for a in E["ap50"]]
    assert E["easy_minus_hard"]["mean"] == pytest.approx(sum(d) / 2, abs=1e-4)
    assert E["easy_minus_hard"]["std"] == pytest.approx(abs(d[0] - d[1]) / 2, abs=1e-4)
    assert "Attribute guidance w_d 2. Noise seeds 0, 1" in (out / "report.md").read_text()


def test_masks_part_in_the_report(run):
    out, M = run
    assert 0 <= M["mask_iou_head"] <= 1 and 0 <= M["mask_iou_real_gt"] <= 1 and 0 <= M["mask_iou_box"] <= 1
    assert "7. Exported instance masks" in (out / "report.md").read_text()


def test_ablation_rows_are_checked_before_anything_runs_and_add_to_the_earlier_ones(run):
    out, first = run
    with pytest.raises(config.DataError,
                       match="^--ablation-rows: unknown lambda 7 \\(choose from both on, loss off"):
        evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity", ablations=True,
                                                   ablation_rows="loss off,lambda 7"))
    # no part but the ablations, with an Inception network (a stand-in): its FID per row, the run's
    # own FID kept
    from test_fid import NvidiaLike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch.jit is deprecated in torch 2.14
        torch.jit.save(torch.jit.script(NvidiaLike()), str(out / "standin.pt"))
    before = json.loads((out / "metrics.json").read_text())
    evaluate.evaluate(out,
                      evaluate.EvalConfig(quick=True, parts="", ablations=True,
                                          ablation_rows="loss off",
                                               inception=str(out / "standin.pt")))
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["ablations"]) == set(first["ablations"])              # the other rows are kept
    assert saved["fid"] == before["fid"] and saved["ablations"]["loss off"]["fid"] >= 0


def test_a_finished_ablation_of_another_budget_is_not_reused(run):
    out, _ = run                             # the quick ablations trained 3 steps; the run itself 4
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    with pytest.raises(config.DataError,
                       match=r"loss_off/ckpt.pt: trained with another budget \(minutes 0, steps 3 "
                       r"instead of minutes 0, steps 4\)"):
        ablations.train_ablation(out, ck, "loss off", dict(pal_weight=0.0), evaluate.EvalConfig(),
                                 print)


def test_evaluate_refuses_an_unknown_sampler(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--run", "x", "--sampler", "euler"])
    assert "invalid choice: 'euler'" in capsys.readouterr().err
