"""experiments/ablations.py: the rows and the budget of the ablation generators."""
import pytest
import torch

import config
from experiments import ablations, evaluate


def test_ablation_budget_is_the_runs_step_count_by_default():
    ck = {"step": 1679}
    assert ablations.ablation_budget(evaluate.EvalConfig(), ck) == dict(minutes=0, steps=1679)
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_steps=500), ck) == dict(
        minutes=0, steps=500
    )
    # the run's --minutes
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_steps=0), ck) == {}
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_minutes=2.5),
                                     ck) == dict(minutes=2.5)


def test_a_finished_ablation_of_another_budget_is_a_one_line_data_error(tmp_path):
    """A stand-in finished checkpoint of 3 steps where the run took 4: refused before anything
    trains."""
    path = tmp_path / "ablations" / "loss_off" / "ckpt.pt"
    path.parent.mkdir(parents=True)
    torch.save(dict(finished=True, train_cfg=dict(minutes=0, steps=3)), path)
    with pytest.raises(config.DataError,
                       match=r"loss_off/ckpt.pt: trained with another budget \(minutes 0, steps 3 "
                       r"instead of minutes 0, steps 4\)") as e:
        ablations.train_ablation(tmp_path, dict(step=4, train_cfg={}), "loss off",
                                 dict(pal_weight=0.0),
                                 evaluate.EvalConfig(), print)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
