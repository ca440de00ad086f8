"""experiments/report.py: the paper's claims as a run answers them, against hand-computed
verdicts."""
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
