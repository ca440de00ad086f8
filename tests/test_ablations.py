"""ablations.py: the rows and the budget of the ablation generators."""
import ablations
import evaluate


def test_ablation_budget_is_the_runs_step_count_by_default():
    ck = {"step": 1679}
    assert ablations.ablation_budget(evaluate.EvalConfig(), ck) == dict(minutes=0, steps=1679)
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_steps=500), ck) == dict(minutes=0, steps=500)
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_steps=0), ck) == {}          # the run's --minutes
    assert ablations.ablation_budget(evaluate.EvalConfig(ablation_minutes=2.5), ck) == dict(minutes=2.5)
