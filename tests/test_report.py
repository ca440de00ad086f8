"""report.py: the targets' verdicts against hand-computed ones."""
from experiments import report


def test_targets_against_hand_computed_verdicts():
    M = dict(real_map50=0.9, fidelity_map50=0.6, easy_ap50=0.5, hard_ap50=0.42, crop_acc_origin=0.69,
             trainability=dict(runs=dict(real=[], origin=[], hard=[]), real=dict(mean=0.30, std=0.01),
                               origin=dict(mean=0.31, std=0.02), hard=dict(mean=0.33, std=0.01)))
    got = {what.split(" (")[0]: (val, ok) for what, val, ok in report.targets(M)}
    assert got["fidelity_map50 / real_map50 >= 0.5"] == ("0.67", True)
    assert got["fidelity_map50 / real_map50 >= 0.8"] == ("0.67", False)
    assert got["easy_ap50 - hard_ap50 >= 0.05"] == ("+0.080", True)
    assert got["crop_acc_origin >= 0.7"] == ("0.690", False)
    assert got["best train_aug_*_map50 - train_real_map50 >= 0.02"][1] is True       # best is hard: +0.03
