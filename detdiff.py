"""DetDiffusion's main job (docs/paper.md sections 1-4 at CPU scale): the pipeline data -> detector
-> attributes -> (autoencoder) -> generator -> grid into one run folder, and the command line of
every run setting.

    python detdiff.py                                   # the main job on `shapes` into runs/shapes (~13 min, CPU)
    python detdiff.py --stage generator --steps 200 --out runs/quick   # one stage; --help lists every setting
    python detdiff.py --out runs/shapes --resume        # continue a killed run from its last checkpoint
    python detdiff.py --paper                           # the paper's lambda 0.01, token conditioning, plain
                                                        # L_simple, linear schedule, no attribute guidance
                                                        # (PAPER_SETTINGS; the defaults differ where the
                                                        # studies of docs/experiments.md measured better)
    python detdiff.py --evaluate                        # the main job, then the evaluation's report on the run
    python detdiff.py --space latent --image-size 64    # latent mode: an autoencoder stage, the UNet on its latents
    python detdiff.py --data DIR --detector torchvision:fasterrcnn_resnet50_fpn --detector-weights
                                                        FILE # the user's perceptive model for the
                                                        attribute and the # fidelity metric (also a
                                                        detdiff .pt or a COCO results json)
    torchrun --nproc_per_node=2 detdiff.py --stage generator ...   # DDP (gloo on CPU, nccl on CUDA)

Where each stage's concept lives: data.py (and data_sets/shapes.py, the embedded data set), perceptive/detector.py (the
perceptive model trained from scratch; perceptive/detections.py for the user's, perceptive/coco_map.py for its mAP),
perception.py (the attribute and the perception loss), autoencoder.py (latent mode), train.py (the
generator's training loop and `TrainConfig`, its settings; the stages' settings are `PipelineConfig`
here; `--help` lists both), sample.py and experiments/evaluate.py (the grid stage and `--evaluate`). The
notation (beta_t, alpha_bar_t, x_t, eps, eps_theta, L_simple, L_p, lambda) is tabled in
diffusion.py. """
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

import autoencoder
import config
import data
import diffusion
import sample
import train
import unet
from data_sets import export, shapes
from experiments import evaluate, figures
from experiments.report import summary_text
from perceptive import attributes, coco_map, detections, detector
from train import TrainConfig
from unet import UNetConfig


# --------------------------------------------------------------------------------------------------
# The main job's settings beyond the generator's (TrainConfig, train.py)

STAGES = ("data", "detector", "attributes", "autoencoder", "generator", "grid")


@dataclass
class PipelineConfig:
    """Which stages run, the perceptive model (detector), the attribute, the quick fidelity check,
    --evaluate: each field a flag of detdiff.py beside TrainConfig's and UNetConfig's (perception.py
    has two stages as commands)."""
    CHOICES: ClassVar[dict] = dict(stage=("all",) + STAGES)
    stage: str = "all"         # all | data | detector | attributes | autoencoder | generator | grid
    detector: str = ""               # the perceptive model (attribute and fidelity metric) from the
                                     # user instead of training one: a detdiff detector .pt, a COCO
                                     # results .json made on the data set's own images (attribute
                                     # only), or torchvision:NAME (e.g. torchvision:
                                     # fasterrcnn_resnet50_fpn) with --detector-weights FILE;
                                     # nothing is downloaded
    detector_weights: str = ""       # local weights file of a torchvision:NAME detector
    detector_classes: str = ""       # data-set class=detector class,... where names differ (every
                                     # class must map)
    det_steps: int = 1000       # detector (perception metric) optimizer steps, trained from scratch
    det_size: int = 64               # detector input side
    attr_steps: int = 400      # steps of each held-out fold's detector (perception-aware attribute)
    attr_folds: int = 2
    gamma: float = 0.4        # attribute: confidence threshold (our choice; the paper's is unknown)
    beta: float = 0.5                # attribute: IoU threshold
    class_aware: bool = False        # attribute: a prediction must also have the object's class
    n_eval: int = 100       # val layouts generated for the grid stage's quick layout-fidelity check
    evaluate: bool = False           # then run experiments/evaluate.py on the run folder: report.md,
                                     # metrics.json (see its docstring; about 25 min on shapes)


# --------------------------------------------------------------------------------------------------
# The command line: every field of TrainConfig, PipelineConfig and UNetConfig is a flag

RESUME_OVERRIDES = {"steps", "minutes", "log_every", "sample_every", "ckpt_every", "out", "resume",
                    "device", "stage",
                    "n_eval", "evaluate", "attr_guidance"}
TOKENIZER_FIELDS = {"vocab_size", "seq_len", "tokens_per_object", "max_objects", "pad_id",
                    "class_offset",
                    "loc_offset", "bins"}


def model_fields():
    return [f for f in fields(UNetConfig) if f.name not in TOKENIZER_FIELDS]


# The paper's own settings where the defaults (docs/experiments.md, README) differ from them;
# `--paper` sets them all, and any flag given beside it still wins. The schedule is DDPM's linear
# one (the paper's Stable Diffusion uses a scaled-linear variant of it). The paper names no
# optimiser; AdamW is what Stable Diffusion is trained and fine-tuned with.
PAPER_SETTINGS = dict(cond="tokens", pal_weight=0.01, loss_weight="none", fg_reweight=False,
                      schedule="linear", p_uncond_attr=0.0, optimizer="adamw")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paper", action="store_true", default=argparse.SUPPRESS,
                    help="the paper's settings: " + " ".join(f"{k}={v}" for k, v in PAPER_SETTINGS.items()))
    config.add_flags(ap.add_argument_group("generator (TrainConfig)"), TrainConfig, given_only=True)
    config.add_flags(ap.add_argument_group("stages (PipelineConfig)"), PipelineConfig,
                     given_only=True)
    config.add_flags(ap.add_argument_group("model (UNetConfig)"), UNetConfig, only=model_fields(),
                     given_only=True)
    return ap


def parse_flags(argv=None):
    """The command line as a flat dict of the flags given; --paper puts PAPER_SETTINGS under
    them."""
    given = vars(build_parser().parse_args(argv))
    return {**PAPER_SETTINGS, **given} if given.pop("paper", False) else given


def split_args(given):
    """Flat dict of flags -> (TrainConfig kwargs, PipelineConfig kwargs, UNetConfig kwargs); an
    unknown key is an error."""
    groups = [{f.name for f in fields(TrainConfig)}, {f.name for f in fields(PipelineConfig)},
              {f.name for f in model_fields()}]
    unknown = set(given) - set().union(*groups)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return tuple({k: v for k, v in given.items() if k in names} for names in groups)


def resumed_settings(targs, pargs, margs):
    """--resume: the run's saved settings, with only RESUME_OVERRIDES allowed to change."""
    out = train.run_folder(TrainConfig(**targs))
    ck_path = out / "ckpt.pt"
    if not ck_path.is_file():
        raise config.DataError(f"{ck_path}: no checkpoint to resume from")
    saved = config.load_file(ck_path)
    old = {**asdict(PipelineConfig()), **TrainConfig.ADDED, **saved.get("pipeline_cfg", {}),
           **saved["train_cfg"]}
    changed = {k for k, v in {**targs, **pargs}.items()
               if k not in RESUME_OVERRIDES and old.get(k, getattr(TrainConfig, k, None)) != v}
    if changed or margs:
        raise config.DataError(f"--resume keeps the run's saved settings; these differ: "
                             f"{sorted(changed) + sorted(margs)} (only {sorted(RESUME_OVERRIDES)} "
                             f"may change)")
    pnames = {f.name for f in fields(PipelineConfig)}
    return ({**saved["train_cfg"], **targs, "out": str(out)},
            {**{k: v for k, v in old.items() if k in pnames}, **pargs})


# --------------------------------------------------------------------------------------------------
# The main job: data -> detector -> attributes -> (autoencoder) -> generator -> grid, then a summary
# (docs/paper.md sections 1-3). Each stage is a function of the open run `r`; a stage whose output
# exists is reused.

SAME_RUN = ("data", "image_size", "bins", "max_objects", "min_area", "pal_weight", "attributes",
            "detector", "detector_weights", "detector_classes", "det_steps", "det_size",
            "attr_steps", "attr_folds",
            "gamma", "beta", "class_aware", "seed", "space",
            "autoencoder", "ae_steps", "ae_factor", "ae_channels", "ae_latent_channels",
            "ae_edge_weight")


def pipeline(cfg, pcfg=None, mcfg_overrides=None):
    """Run the stages of `pcfg` (PipelineConfig; default all) with the generator settings `cfg`
    (TrainConfig) and UNetConfig overrides into one run folder. Returns the summary (also
    RUN/summary.json)."""
    r = open_run(cfg, pcfg or PipelineConfig(), mcfg_overrides)
    stage_data(r)
    stage_detector(r)
    stage_attributes(r)
    stage_autoencoder(r)
    stage_generator(r, mcfg_overrides)
    stage_grid(r)
    r.summary["seconds"] = {k: round(v, 1) for k, v in r.timing.items()}
    r.summary["seconds"]["total"] = round(time.time() - r.t_all, 1)
    (r.out / "summary.json").write_text(json.dumps(r.summary, indent=1))
    r.log(summary_text(r.summary))
    r.log.close()
    if r.pcfg.evaluate:                          # the paper's experiments on this run (experiments/evaluate.py)
        # see experiments/evaluate.py
        blind = ("fidelity", "easy_hard") if isinstance(r.given, detections.ResultsFile) else ()
        r.summary["evaluate"] = evaluate.evaluate(r.out, evaluate.EvalConfig(
            parts=",".join(p for p in evaluate.PARTS if p not in blind), device=cfg.device,
            dtype=cfg.dtype))
    return r.summary


@dataclass
class Run:
    """The open run the stages share: made by `open_run`, each stage reads it and adds what it
    made."""
    cfg: TrainConfig
    pcfg: PipelineConfig
    out: Path                        # the run folder
    root: Path                       # the data set
    device: torch.device
    dtype: str                       # resolved: fp32 | bf16 | fp16
    log: config.RunLog
    stages: set                      # the stages this call runs
    t_all: float = field(default_factory=time.time)
    summary: dict = field(default_factory=dict)   # summary.json, each stage adding its part
    timing: dict = field(default_factory=dict)    # seconds per stage
    train_ds: data.CocoLayoutDataset = None       # the stage data's splits at det_side
    val_ds: data.CocoLayoutDataset = None
    det_side: int = 0           # the side the perceptive model sees (detections.input_side)
    given: object = None        # the user's perceptive model (--detector), opened by the data stage


def open_run(cfg, pcfg, mcfg_overrides):
    """Every check that can fail before a stage runs (settings, data set, device, image size, a
    folder made with other settings), then the run folder, its pipeline.json and log."""
    config.check_choices(cfg)
    config.check_choices(pcfg)
    out = train.run_folder(cfg)
    cfg.out = str(out)
    root = shapes.build_if_missing(cfg.data)       # a missing or bad data set stops before anything
                                                   # is written
    device, device_why = config.resolve_device(cfg.device)     # so does a device this machine lacks
    if not cfg.resume:                   # and an image size the UNet (or autoencoder) cannot divide
        train.check_sizes(cfg, mcfg_overrides)
    dtype, dtype_why = config.resolve_dtype(cfg.dtype, device)
    # the evaluation reopens it from anywhere
    if pcfg.detector and not pcfg.detector.startswith("torchvision:"):
        pcfg.detector = str(Path(pcfg.detector).resolve())
    if pcfg.detector_weights:
        pcfg.detector_weights = str(Path(pcfg.detector_weights).resolve())
    out.mkdir(parents=True, exist_ok=True)
    both = {**asdict(cfg), **asdict(pcfg)}
    settings, saved = {k: both[k] for k in SAME_RUN}, out / "pipeline.json"
    old = config.read_json(saved) if saved.is_file() else None
    if old is not None:   # reusing a stage is only right if it was made with the same settings
        # a setting added since: its default then
        default = {**asdict(TrainConfig()), **asdict(PipelineConfig())}
        changed = sorted(k for k in SAME_RUN if old.get(k, default[k]) != settings[k])
        if changed:
            raise config.DataError(f"{out} holds a run made with other settings "
                                   f"({', '.join(changed)}); choose a new --out")
    if old is None or set(SAME_RUN) - set(old):
        saved.write_text(json.dumps(settings, indent=1))
    r = Run(cfg, pcfg, out, root, device, dtype, config.RunLog(out / "log.txt"),
            stages=set(STAGES) if pcfg.stage == "all" else {pcfg.stage}, summary=dict(run=str(out)))
    r.log(f"[device] every stage on {r.device} ({device_why}), dtype {r.dtype} ({dtype_why})")
    return r


def stage_data(r):
    """The embedded `shapes` set is built on first use; a COCO folder is checked."""
    t = time.time()
    r.det_side = detections.input_side(asdict(r.pcfg), r.cfg.image_size)
    det_cfg = dict(size=r.det_side, min_area=r.cfg.min_area, max_objects=r.cfg.max_objects)
    r.train_ds, r.val_ds = (data.CocoLayoutDataset(r.root, sp, **det_cfg) for sp in ("train", "val"))
    names = r.train_ds.class_names
    r.summary["data"] = dict(root=str(r.root), classes=list(names), train_images=len(r.train_ds),
                             val_images=len(r.val_ds))
    r.timing["data"] = time.time() - t
    r.log(f"[data] {r.root}: {len(r.train_ds)} train / {len(r.val_ds)} val images, classes "
          f"{', '.join(names)}")
    # the user's perceptive model (--detector), opened here so its classes are checked before
    # anything is trained
    r.given = detections.run_detector(r.out, asdict(r.pcfg), names, r.train_ds.category_ids,
                                      r.device) \
        if r.pcfg.detector else None
    if r.det_side != r.pcfg.det_size:
        r.log(f"[data] the given detector sees images at {r.det_side} px, the data's side "
              f"(--image-size), not --det-size {r.pcfg.det_size}: it resizes them itself")


def stage_detector(r):
    """The user's detector (--detector), or one trained from scratch on the real training split: the
    perception metric of every later stage and, with --detector, the attribute's too."""
    det_path, det_json, pcfg = r.out / "detector.pt", r.out / "detector.json", r.pcfg
    crowd = data.split_paths(r.root, "val")[0]
    if "detector" in r.stages:
        t = time.time()
        if det_json.is_file() and (r.given is not None or det_path.is_file()):
            r.log(f"[detector] reusing {det_json}")
        elif r.given is not None:
            val_src = r.given.subset({x["image_id"] for x in r.val_ds.records}) \
                if isinstance(r.given, detections.ResultsFile) else r.given
            m = coco_map.evaluate(val_src, r.val_ds, crowd_json=crowd)
            det_json.write_text(json.dumps(dict(mAP=m["mAP"], AP50=m["AP50"], AP75=m["AP75"],
                                                seconds=0.0,
                                                source=detections.describe(r.given),
                                                per_category=m["per_category"]), indent=1))
            r.log(f"[detector] given: {detections.describe(r.given)}; val mAP {m['mAP']:.3f} AP50 "
                  f"{m['AP50']:.3f}")
        else:
            names = tuple(r.train_ds.class_names)
            det = detector.train(r.train_ds,
                                 detector.DetectorConfig(len(names), names, pcfg.det_size),
                                 detector.DetTrainConfig(steps=pcfg.det_steps, seed=r.cfg.seed,
                                                         log_every=max(pcfg.det_steps // 5, 1)),
                                 log=r.log, device=r.device, dtype=r.dtype)
            secs = time.time() - t
            detector.save_detector(det, det_path)
            m = coco_map.evaluate(det, r.val_ds, crowd_json=crowd)
            det_json.write_text(json.dumps(dict(mAP=m["mAP"], AP50=m["AP50"], AP75=m["AP75"],
                                                seconds=round(secs, 1),
                                                per_category=m["per_category"]), indent=1))
            r.log(f"[detector] trained in {secs:.0f}s: val mAP {m['mAP']:.3f} AP50 {m['AP50']:.3f} "
                  f"AP75 {m['AP75']:.3f}")
        r.timing["detector"] = time.time() - t
    if det_json.is_file():
        r.summary["detector"] = config.read_json(det_json)


def stage_attributes(r):
    """[easy] / [hard] for every object from held-out-fold detectors (docs/paper.md section 2)."""
    attr_path, cfg, pcfg = r.out / "attributes.json", r.cfg, r.pcfg
    if "attributes" in r.stages and cfg.attributes == "auto":
        t = time.time()
        if attr_path.is_file():
            r.log(f"[attributes] reusing {attr_path}")
        else:
            attributes.make_attributes(r.root, r.out, attributes.AttributeConfig(
                gamma=pcfg.gamma, beta=pcfg.beta, class_aware=pcfg.class_aware,
                folds=pcfg.attr_folds,
                image_size=r.det_side, min_area=cfg.min_area, max_objects=cfg.max_objects,
                steps=pcfg.attr_steps,
                seed=cfg.seed), source=r.given, log=r.log,      # given=None: held-out folds of our
                                                                # own detector
                device=r.device, dtype=r.dtype)
        r.timing["attributes"] = time.time() - t
    if attr_path.is_file() and cfg.attributes == "auto":
        s = config.read_json(attr_path)["summary"]["train"]
        r.summary["attributes"] = dict(
            hard_fraction=s["hard_fraction"],
            per_category={k: v["hard_fraction"] for k, v in s["per_category"].items()},
            per_nuisance={k: v["hard_fraction"] for k, v in s.get("per_nuisance", {}).items()},
            warning=s.get("warning"))


def stage_autoencoder(r):
    """--space latent (or asked for by name): the autoencoder trained on the real images, then
    frozen."""
    cfg, ae_path = r.cfg, autoencoder.autoencoder_path(r.cfg, r.out)
    if "autoencoder" in r.stages and (cfg.space == "latent" or r.pcfg.stage == "autoencoder"):
        t = time.time()
        if ae_path.is_file():
            r.log(f"[autoencoder] reusing {ae_path}")
        elif cfg.autoencoder != "auto":
            raise config.DataError(f"{ae_path}: autoencoder not found")
        else:
            autoencoder.train_autoencoder(cfg, r.root, ae_path, r.log, device=r.device,
                                          dtype=r.dtype)
        r.timing["autoencoder"] = time.time() - t
    if cfg.space == "latent" and ae_path.is_file():
        f = config.load_file(ae_path)
        r.summary["autoencoder"] = {k: f.get(k) for k in ("psnr_val", "scale", "latent_shape", "seconds", "fingerprint")}


def grid_seconds(r, mcfg_overrides):
    """What the grid stage will take, measured before the generator trains: a UNet of the run's
    shape (untrained costs the same) samples 32 val layouts the way the grid stage does (one warm-up
    step, then two timed), scaled to the stage's images and steps, plus 10 s for loading, the
    detector's pass and the figure."""
    cfg, names = r.cfg, r.train_ds.class_names
    tok = data.LayoutTokenizer(names, bins=cfg.bins, max_objects=cfg.max_objects)
    latent = cfg.ae_latent_channels if cfg.space == "latent" else None
    model = unet.UNet(train.model_config(cfg, tok, mcfg_overrides, latent)).to(r.device).eval()
    diff = diffusion.Diffusion(cfg.timesteps, cfg.schedule).to(r.device)
    # 3 prompts
    lays = sample.with_difficulty([r.val_ds[i] for i in range(min(32, len(r.val_ds)))], "easy")
    tokens = torch.stack([tok.encode(x["boxes"], x["labels"],
                                     x["difficulty"]) for x in lays]).to(r.device)
    kw = dict(
        size=cfg.image_size // (cfg.ae_factor if latent else 1),
        sampler=cfg.sampler,
        guidance=cfg.guidance,
        progress=False,
        attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, dict(train_cfg=asdict(cfg))),
        dtype=config.sampling_dtype(r.dtype, r.device),
    )
    sample.generate(model, diff, tokens, tok.null_prompt().to(r.device), steps=1, **kw)    # warm-up
    t = time.time()
    sample.generate(model, diff, tokens, tok.null_prompt().to(r.device), steps=2, **kw)
    per_image_step = (time.time() - t) / (2 * len(lays))
    return (r.pcfg.n_eval + 2 * cfg.n_grid) * cfg.sample_steps * per_image_step + 10.0


def generator_budget(r, mcfg_overrides):
    """--minutes bounds the whole main job: the generator trains what the stages before it and the
    grid stage (measured, grid_seconds) leave. --stage generator, --resume and --minutes 0 keep
    --minutes as it is."""
    cfg = r.cfg
    if r.pcfg.stage != "all" or cfg.resume or cfg.minutes <= 0:
        return cfg
    spent, grid = time.time() - r.t_all, grid_seconds(r, mcfg_overrides)
    left = 60 * cfg.minutes - spent - grid
    if left < 30:
        raise config.DataError(f"--minutes {cfg.minutes:g}: the stages before the generator took "
                               f"{spent:.0f} s and the grid stage needs about {grid:.0f} s, which "
                               f"leaves {left:.0f} s to train; give more")
    r.log(f"[budget] {cfg.minutes:g} min in all: {spent:.0f} s spent, about {grid:.0f} s for the "
          f"grid stage (measured), so the generator trains {left / 60:.2f} min")
    return replace(cfg, minutes=round(left / 60, 3))


def stage_generator(r, mcfg_overrides):
    """The layout-conditioned UNet with the perception loss (train.py), for what the budget leaves
    it."""
    ckpt_path = r.out / "ckpt.pt"
    if "generator" in r.stages:
        t = time.time()
        ck = config.load_file(ckpt_path) if ckpt_path.is_file() else None
        if ck is not None and ck.get("finished") and not r.cfg.resume:
            r.log(f"[generator] reusing {ckpt_path} (step {ck['step']})")
        else:
            train.train(generator_budget(r, mcfg_overrides), mcfg_overrides,
                        pipeline_cfg=asdict(r.pcfg))
        r.timing["generator"] = time.time() - t
    if ckpt_path.is_file():
        ck = config.load_file(ckpt_path)
        h = ck["history"]
        curves = {k: (h["step"], h[k]) for k in ("loss", "l_simple", "l_p") if h.get(k)}
        figures.loss_curve(curves, r.out / "loss.png", f"{r.out.name}: training loss (log scale)")
        r.summary["generator"] = dict(
            steps=ck["step"], minutes=round(ck["elapsed"] / 60, 2), dtype=ck.get("dtype"),
            img_s=round(ck.get("img_s", 0.0), 1), finished=bool(ck.get("finished")),
            loss_last100=round(float(np.mean(h["loss"][-100:])), 4),
            l_p_last100=round(float(np.mean(h["l_p"][-100:])), 4) if h.get("l_p") else None)


def stage_grid(r):
    """The same val layouts as origin / all-easy / all-hard (easy_hard.png), and a quick
    layout-fidelity check."""
    grid_path, fidelity_json = r.out / "easy_hard.png", r.out / "fidelity.json"
    if "grid" in r.stages:
        t = time.time()
        if grid_path.is_file() and fidelity_json.is_file():
            r.log(f"[grid] reusing {grid_path}")
        else:
            fidelity = grid_and_fidelity(r, grid_path)
            fidelity_json.write_text(json.dumps(fidelity, indent=1))
        r.timing["grid"] = time.time() - t
        if fidelity_json.is_file():
            r.summary["fidelity"] = config.read_json(fidelity_json)


def grid_and_fidelity(r, grid_path):
    """Generate the val layouts, draw the grid, and score the generated images with the run's
    detector against the real ones at the same resolution (the paper's YOLO score, quick version;
    experiments/evaluate.py has the full one)."""
    cfg, out, ckpt_path, det_path = r.cfg, r.out, r.out / "ckpt.pt", r.out / "detector.pt"
    for need in (ckpt_path,) if r.given is not None else (ckpt_path, det_path):
        if not need.is_file():
            raise config.DataError(f"{need}: missing; run the stage that makes it first (--stage "
                                   f"all)")
    model, tok, diff, ck = sample.load_checkpoint(ckpt_path, device=r.device)
    S, names = ck["train_cfg"]["image_size"], tok.class_names
    kw = dict(steps=cfg.sample_steps, sampler=cfg.sampler, guidance=cfg.guidance, seed=cfg.seed,
              progress=False,
              dtype=config.sampling_dtype(r.dtype, r.device),
              autoencoder=autoencoder.checkpoint_autoencoder(ck, ckpt_path, device=r.device),
              attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, ck))
    lays = sample.split_layouts(ck, max(cfg.n_grid, r.pcfg.n_eval))
    real_ds = data.CocoLayoutDataset(r.root, "val", size=S, check_files=False)
    real = [real_ds.load(i)["image"] for i in range(len(lays))]
    t_s = time.time()
    origin = sample.generate_layouts(model, diff, tok, lays, S, **kw)
    sec_per_img = (time.time() - t_s) / len(lays)
    gen = dict(origin=origin,
               **{d: sample.generate_layouts(model, diff, tok, sample.with_difficulty(
        lays[:cfg.n_grid], d), S, **kw) for d in ("easy", "hard")})
    evaluate.easy_hard_figure(real, gen, lays, names, grid_path, n=cfg.n_grid)
    det = r.given if r.given is not None else detector.load_detector(det_path).to(r.device)
    fidelity = dict(n_layouts=len(lays), sampler=f"{cfg.sampler}-{cfg.sample_steps}",
                    guidance=cfg.guidance,
                    sec_per_img=round(sec_per_img, 4))
    if isinstance(det, detections.ResultsFile):   # a results json has not seen the generated images
        export.write_coco(out / "fidelity_generated", "val", origin, lays, names,
                          ck["tokenizer"]["category_ids"])
        fidelity["note"] = (f"no fidelity score: {r.pcfg.detector} is a results json; run that "
                            f"detector on {out / 'fidelity_generated'} and score it with `python "
                            f"-m perceptive eval --data {out / 'fidelity_generated'} --results "
                            f"YOURS.json`")
        r.log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); {fidelity['note']}")
        return fidelity
    for name, ims in (("real", real), ("generated", origin)):
        fidelity[name] = evaluate.detector_ap(det, ims, lays, names,
                                              ck["tokenizer"]["category_ids"],
                                              out / f"fidelity_{name}", r.det_side,
                                              cfg.max_objects)
    r.log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); detector AP50 on "
          f"{len(lays)} val layouts at {S}px: real {fidelity['real']['AP50']:.3f}, generated "
          f"{fidelity['generated']['AP50']:.3f}; {sec_per_img:.3f} s per generated image")
    return fidelity


def main(argv=None):
    targs, pargs, margs = split_args(parse_flags(argv))
    try:
        resume = bool(targs.get("resume"))
        if resume:
            targs, pargs = resumed_settings(targs, pargs, margs)
        # a resumed run's saved settings may predate a setting (TrainConfig.ADDED); a new run's are
        # the flags given on today's defaults
        cfg = config.from_saved(TrainConfig, targs) if resume else TrainConfig(**targs)
        pcfg = PipelineConfig(**pargs)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun: the generator stage only, every
                                                         # rank trains
            if pcfg.stage != "generator":
                raise config.DataError("under torchrun pass --stage generator (the other stages "
                                       "run in one process: python detdiff.py --stage detector / "
                                       "attributes / grid)")
            train.train(cfg, margs, pipeline_cfg=asdict(pcfg))
        else:
            pipeline(cfg, pcfg, margs)
    except (config.DataError, FloatingPointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
