"""Ablations (docs/paper.md section 4): the perception loss and the perception-aware attribute, on and
off, and the weight lambda of L_p; each ablation generator trained into RUN/ablations/<name> with
the run's own settings otherwise and the same budget (by default as many steps as the run), then
scored by evaluate.py (`--ablations`).

    python -m experiments.evaluate --run runs/shapes --ablations --ablation-rows "loss off,attribute off"
"""
from dataclasses import replace
from pathlib import Path

import config
import train


def ablation_settings(tc):
    """name -> TrainConfig overrides. 'both on' is the run's own setting."""
    lam = tc["pal_weight"] or 0.1
    out = {"both on": {}, "loss off": dict(pal_weight=0.0),
           "attribute off": dict(attributes="none"),
           "both off": dict(pal_weight=0.0, attributes="none")}
    for v in (0.01, 0.1, 1.0):
        if v != lam:
            out[f"lambda {v:g}"] = dict(pal_weight=v)
    return out


def ablation_budget(cfg, ck):
    """TrainConfig overrides for an ablation generator's budget: by default the run's own number of
    steps (so a slower or busier machine cannot favour one row), else --ablation-steps N,
    --ablation-minutes M, or {} (the run's own --minutes / --steps when --ablation-steps 0)."""
    if cfg.ablation_minutes:
        return dict(minutes=cfg.ablation_minutes)
    if cfg.ablation_steps:
        return dict(minutes=0, steps=ck["step"] if cfg.ablation_steps < 0 else cfg.ablation_steps)
    return {}


def train_ablation(run, ck, name, overrides, cfg, log, into=None):
    """The checkpoint of one ablation generator, trained into INTO/ablations/<name> (INTO: the run
    folder unless given; reused when finished) on the evaluation's device and dtype (cfg.device,
    cfg.dtype). A finished one of another budget is a DataError."""
    tc, budget = ck["train_cfg"], ablation_budget(cfg, ck)
    if not overrides and (not budget or budget.get("steps") == ck["step"]):
        return run / "ckpt.pt"                 # 'both on' at the run's own budget is the run itself
    out = Path(into or run) / "ablations" / name.replace(" ", "_")
    path = out / "ckpt.pt"
    done = config.load_file(path) if path.is_file() else {}
    if done.get("finished"):
        had = done["train_cfg"]
        if not cfg.quick and any(had.get(k) != v for k, v in budget.items()):
            raise config.DataError(f"{path}: trained with another budget "
                                   f"({', '.join(f'{k} {had.get(k)}' for k in budget)} instead of "
                                   f"{', '.join(f'{k} {v}' for k, v in budget.items())}); remove "
                                   f"that folder to retrain it, or pass the budget it had "
                                   f"(--ablation-steps / --ablation-minutes)")
        log(f"[ablations] reusing {path}")
        return path
    attrs = str(run / "attributes.json") if tc["attributes"] == "auto" else tc["attributes"]
    if ck.get("autoencoder"):                     # a latent-space run: the same frozen autoencoder
        overrides = dict(overrides, autoencoder=ck["autoencoder"]["path"])
    tcfg = config.from_saved(train.TrainConfig, {**tc, "attributes": attrs, **budget, **overrides, "out": str(out),
                                "resume": path.is_file(), "device": cfg.device, "dtype": cfg.dtype})
    if cfg.quick:
        tcfg = replace(tcfg, steps=3, minutes=0, sample_every=0, ckpt_every=0, log_every=1)
    log(f"[ablations] training {name} into {out}")
    train.train(tcfg, pipeline_cfg=ck.get("pipeline_cfg"))      # the run's stage settings, for its
                                                                # evaluation
    return path
