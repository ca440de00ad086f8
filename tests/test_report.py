"""experiments/report.py: the paper's claims as a run answers them, against hand-computed
verdicts."""
import json

import pytest

from config import DataError
from experiments import report


def test_claims_against_hand_computed_verdicts():
    M = dict(real_map50=0.9, fidelity_map50=0.6, easy_ap50=0.5, hard_ap50=0.42,
             crop_acc_origin=0.69,
             trainability=dict(runs=dict(real=[], origin=[], hard=[]), real=dict(mean=0.30,
                                                                                 std=0.01),
                               origin=dict(mean=0.31, std=0.02), hard=dict(mean=0.33, std=0.01)))
    got = {what.split(" (")[0]: (val, ok) for what, val, ok in report.claims(M)}
    # 0.6 / 0.9, a number to read
    assert got["the detector finds the generated objects"] == ("0.67", None)
    assert got["all-[easy] images are detected better than all-[hard]"] == ("+0.080", True)
    # best: hard
    assert got["generated data trains a better detector"] == ("+0.030 (spread 0.010 / 0.010)", True)
    M.update(easy_ap50=0.40, trainability=dict(runs=dict(real=[], origin=[]), real=dict(mean=0.30,
                                                                                        std=0.01),
                                               origin=dict(mean=0.29, std=0.02)))
    got = {what.split(" (")[0]: (val, ok) for what, val, ok in report.claims(M)}
    assert got["all-[easy] images are detected better than all-[hard]"] == ("-0.020", False)
    assert got["generated data trains a better detector"][1] is False


def test_ablation_row_from_hand_made_metrics(tmp_path, capsys):
    M = dict(meta=dict(generator_steps=5000, generator=dict(seed=1, pal_weight=0.0, attributes="none",
                                                            cond="paint", train_subset=1.0)),
             fidelity_map50=0.85, fidelity_map=0.5712, real_map50=0.938, fid=92.34,
             crop_acc_origin=0.877, crop_acc_easy=0.9364, crop_acc_hard=0.687,
             easy_ap50=0.9, hard_ap50=0.55,
             trainability=dict(runs=dict(real=[], origin=[]), generated_images=dict(origin=2000),
                               real=dict(mean=0.9, std=0.0),
                               rows=dict(real=dict(mAP=dict(mean=0.718, std=0.004)),
                                         origin=dict(mAP=dict(mean=0.7281, std=0.0061)))))
    assert report.ablation_row(M) == (
        "| both off | 0 | off | paint | 1 | 5000 | 0.850 (0.571) of 0.938 | 92.3 | 0.877 / - / - "
        "| - | 0.718 +- 0.004, + 2000: 0.728 +- 0.006 |")            # no attribute: no easy / hard
    g = M["meta"]["generator"]
    g["attributes"] = "x.json"
    assert report.ablation_row(M).startswith("| loss off | 0 | on | paint | 1 | 5000 |")
    assert "| 0.877 / 0.936 / 0.687 | 0.900 / 0.550 (+0.350) |" in report.ablation_row(M)
    names = [report.setting_name(dict(g, pal_weight=w, attributes=a))
             for w, a in ((0.1, "auto"), (0.0, "x.json"), (0.1, "none"), (1.0, "auto"), (1.0, "none"))]
    assert names == ["both on", "loss off", "attribute off", "lambda 1", "attribute off"]
    # a part that was not run reads '-'; a metrics file without the generator's settings is one line
    del M["fid"], M["trainability"]
    assert report.ablation_row(M).endswith("| 0.850 (0.571) of 0.938 | - | 0.877 / 0.936 / 0.687 "
                                           "| 0.900 / 0.550 (+0.350) | - |")
    (tmp_path / "m.json").write_text(json.dumps(M))
    report.main([str(tmp_path / "m.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| setting |") and out[2] == report.ablation_row(M) and len(out) == 7
    assert out[4] == report.SEEDS_HEADER.splitlines()[0] and out[6] == report.seed_rows([M])[0]
    del M["meta"]["generator"]
    (tmp_path / "m.json").write_text(json.dumps(M))
    with pytest.raises(DataError, match=r"m\.json: no meta\.generator"):
        report.main([str(tmp_path / "m.json")])


def test_seed_rows_mean_and_std_over_generator_seeds():
    def metrics(seed, attributes, ap50, fid, crop, easy, hard, real, origin, dtype=None):
        g = dict(seed=seed, pal_weight=0.1, attributes=attributes, cond="paint", train_subset=1.0)
        g.update({"dtype": dtype} if dtype else {})
        return dict(meta=dict(generator_steps=5000, generator=g), fidelity_map50=ap50, fid=fid,
                    real_map50=0.938, crop_acc_origin=crop, easy_ap50=easy, hard_ap50=hard,
                    trainability=dict(generated_images=dict(origin=2000),
                                      rows=dict(real=dict(mAP=dict(mean=real, std=0.004)),
                                                origin=dict(mAP=dict(mean=origin, std=0.002)))))
    Ms = [metrics(0, "a.json", 0.85, 92.0, 0.87, 0.90, 0.50, 0.718, 0.728),
          metrics(0, "none", 0.91, 100.0, 0.93, 0.80, 0.79, 0.718, 0.725),
          metrics(1, "a.json", 0.87, 94.0, 0.89, 0.90, 0.60, 0.718, 0.738, dtype="fp32")]
    # by hand: both on over seeds 0 and 1: AP50 (0.85, 0.87) -> 0.860 +- 0.010; FID 93 +- 1;
    # crop 0.880 +- 0.010; easy - hard (0.40, 0.30) -> 0.350 +- 0.050; gain (0.010, 0.020).
    # Attribute off, one seed: its values alone, and no easy / hard
    assert report.seed_rows(Ms) == [
        "| both on | paint | 5000 | 0, 1 | 0.860 +- 0.010 | 93.0 +- 1.0 | 0.880 +- 0.010 | "
        "0.350 +- 0.050 | 0.015 +- 0.005 |",
        "| attribute off | paint | 5000 | 0 | 0.910 | 100.0 | 0.930 | - | 0.007 |"]
    assert "| 1 (fp32) | 5000 |" in report.ablation_row(Ms[2])   # the dtype it trained in, when recorded
    del Ms[0]["fid"]                                               # a seed without FID: the other's
    assert report.seed_rows(Ms)[0].split(" | ")[5] == "94.0"
