"""DetDiffusion's main job (PAPER.md sections 1-4 at CPU scale): the pipeline data -> detector -> attributes ->
(autoencoder) -> generator -> grid into one run folder, and the command line of every run setting.

    python detdiff.py                                   # the main job on `shapes` into runs/shapes (~13 min, CPU)
    python detdiff.py --stage generator --steps 200 --out runs/quick   # one stage; --help lists every setting
    python detdiff.py --out runs/shapes --resume        # continue a killed run from its last checkpoint
    python detdiff.py --paper                           # the paper's lambda 0.01, token conditioning, plain
                                                        # L_simple, linear schedule, no attribute guidance
                                                        # (PAPER_SETTINGS; the defaults differ where the
                                                        # studies of docs/experiments.md measured better)
    python detdiff.py --evaluate                        # the main job, then evaluate.py's report on the run
    python detdiff.py --space latent --image-size 64    # latent mode: an autoencoder stage, the UNet on its latents
    python detdiff.py --data DIR --detector torchvision:fasterrcnn_resnet50_fpn --detector-weights FILE
                                                        # the user's perceptive model for the attribute and the
                                                        # fidelity metric (also a detdiff .pt or a COCO results json)
    torchrun --nproc_per_node=2 detdiff.py --stage generator ...   # DDP (gloo on CPU, nccl on CUDA)

Where each stage's concept lives: data.py (and shapes.py, the embedded data set), detector.py (the perceptive model
trained from scratch; detections.py for the user's, coco_map.py for its mAP), perception.py (the attribute and the
perception loss), autoencoder.py (latent mode), train.py (the generator's training loop and `TrainConfig`, every
setting; `--help` lists them), sample.py and evaluate.py (the grid stage and `--evaluate`). The notation (beta_t,
alpha_bar_t, x_t, eps, eps_theta, L_simple, L_p, lambda) is tabled in diffusion.py.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

import autoencoder
import coco
import coco_map
import config
import data
import detections
import detector
import evaluate
import perception
import sample
import train
from train import TrainConfig
from unet import UNetConfig


# ----------------------------------------------------------------------------------------------------------------
# The command line: every field of TrainConfig and of UNetConfig is a flag

RESUME_OVERRIDES = {"steps", "minutes", "log_every", "sample_every", "ckpt_every", "out", "resume", "device", "stage",
                    "n_eval", "evaluate", "attr_guidance"}
TOKENIZER_FIELDS = {"vocab_size", "seq_len", "tokens_per_object", "max_objects", "pad_id", "class_offset",
                    "loc_offset", "bins", "location"}


def model_fields():
    return [f for f in fields(UNetConfig) if f.name not in TOKENIZER_FIELDS]


# The paper's own settings where the defaults (docs/experiments.md, README) differ from them; `--paper` sets them all,
# and any flag given beside it still wins. The schedule is DDPM's linear one (the paper's Stable Diffusion uses a
# scaled-linear variant of it).
PAPER_SETTINGS = dict(cond="tokens", pal_weight=0.01, loss_weight="none", fg_reweight=False, schedule="linear",
                      p_uncond_attr=0.0)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paper", action="store_true", default=argparse.SUPPRESS,
                    help="the paper's settings: " + " ".join(f"{k}={v}" for k, v in PAPER_SETTINGS.items()))
    config.add_flags(ap.add_argument_group("run"), TrainConfig, given_only=True)
    config.add_flags(ap.add_argument_group("model (UNetConfig)"), UNetConfig, only=model_fields(), given_only=True)
    return ap


def parse_flags(argv=None):
    """The command line as a flat dict of the flags given; --paper puts PAPER_SETTINGS under them."""
    given = vars(build_parser().parse_args(argv))
    return {**PAPER_SETTINGS, **given} if given.pop("paper", False) else given


def split_args(given):
    """Flat dict of flags -> (TrainConfig kwargs, UNetConfig kwargs); an unknown key is an error."""
    tnames, mnames = {f.name for f in fields(TrainConfig)}, {f.name for f in model_fields()}
    unknown = set(given) - tnames - mnames
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return {k: v for k, v in given.items() if k in tnames}, {k: v for k, v in given.items() if k in mnames}


# ----------------------------------------------------------------------------------------------------------------
# The main job: data -> detector -> attributes -> generator -> grid, then a summary (PAPER.md sections 1-3)

STAGES = TrainConfig.CHOICES["stage"][1:]      # data, detector, attributes, autoencoder, generator, grid
SAME_RUN = ("data", "image_size", "bins", "location", "max_objects", "min_area", "pal_weight", "attributes",
            "detector", "detector_weights", "detector_classes", "det_steps", "det_size", "attr_steps", "attr_folds",
            "gamma", "beta", "class_aware", "seed", "space",
            "autoencoder", "ae_steps", "ae_factor", "ae_channels", "ae_latent_channels", "ae_edge_weight")


def pipeline(cfg, mcfg_overrides=None):
    """Run the stages of the main job into one run folder; a stage whose output exists is reused (and says so)."""
    out = Path(cfg.out or Path("runs") / Path(cfg.data).name)
    cfg.out = str(out)
    if cfg.stage not in ("all",) + STAGES:
        raise SystemExit(f"error: --stage must be all or one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.space not in ("pixel", "latent"):
        raise SystemExit(f"error: --space must be pixel or latent, got {cfg.space!r}")
    root = data.resolve_data(cfg.data)               # a missing or bad data set stops before anything is written
    device, device_why = config.resolve_device(cfg.device)      # so does a device this machine lacks
    if not cfg.resume:                               # and an image size the UNet (or autoencoder) cannot divide
        train.check_sizes(cfg, mcfg_overrides)
    dtype, dtype_why = config.resolve_dtype(cfg.dtype, device)
    sample_dtype = config.sampling_dtype(dtype, device)
    if cfg.detector and not cfg.detector.startswith("torchvision:"):   # evaluate.py reopens it from any folder
        cfg.detector = str(Path(cfg.detector).resolve())
    if cfg.detector_weights:
        cfg.detector_weights = str(Path(cfg.detector_weights).resolve())
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in SAME_RUN}
    saved = out / "pipeline.json"
    if saved.is_file():   # reusing a stage is only right if it was made with the same settings
        old = coco.read_json(saved)
        default = {f.name: f.default for f in fields(TrainConfig)}     # a setting added since: its default then
        changed = sorted(k for k in SAME_RUN if old.get(k, default[k]) != settings[k])
        if changed:
            raise SystemExit(f"error: {out} holds a run made with other settings ({', '.join(changed)}); "
                             f"choose a new --out")
        if set(SAME_RUN) - set(old):
            saved.write_text(json.dumps(settings, indent=1))
    else:
        saved.write_text(json.dumps(settings, indent=1))
    logf = open(out / "log.txt", "a")

    def log(msg):
        tqdm.write(msg)
        logf.write(msg + "\n")
        logf.flush()
    run = set(STAGES) if cfg.stage == "all" else {cfg.stage}
    log(f"[device] every stage on {device} ({device_why}), dtype {dtype} ({dtype_why})")
    t_all, summary = time.time(), dict(run=str(out))
    timing = {}

    # -- data: the embedded `shapes` set is built on first use; a COCO folder is checked
    t = time.time()
    det_cfg = dict(size=cfg.det_size, min_area=cfg.min_area, max_objects=cfg.max_objects)
    train_ds, val_ds = (data.CocoLayoutDataset(root, sp, **det_cfg) for sp in ("train", "val"))
    summary["data"] = dict(root=str(root), classes=list(train_ds.class_names), train_images=len(train_ds),
                           val_images=len(val_ds))
    timing["data"] = time.time() - t
    log(f"[data] {root}: {len(train_ds)} train / {len(val_ds)} val images, classes {', '.join(train_ds.class_names)}")

    # -- detector: the user's (--detector), or trained from scratch on the real training split; the perception
    #    metric of every later stage and, with --detector, the attribute's too
    det_path, det_json = out / "detector.pt", out / "detector.json"
    given = detections.run_detector(out, asdict(cfg), train_ds.class_names, train_ds.category_ids, device) \
        if cfg.detector else None                 # classes checked here, before anything is trained
    if "detector" in run:
        t = time.time()
        if det_json.is_file() and (given is not None or det_path.is_file()):
            log(f"[detector] reusing {det_json}")
        elif given is not None:
            val_src = given.subset({r["image_id"] for r in val_ds.records}) \
                if isinstance(given, detections.ResultsFile) else given
            r = coco_map.evaluate(val_src, val_ds, crowd_json=coco.split_paths(root, "val")[0])
            det_json.write_text(json.dumps(dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"], seconds=0.0,
                                                source=detections.describe(given),
                                                per_category=r["per_category"]), indent=1))
            log(f"[detector] given: {detections.describe(given)}; val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f}")
        else:
            det = detector.train(train_ds, detector.DetectorConfig(
                len(train_ds.class_names), tuple(train_ds.class_names), cfg.det_size),
                detector.DetTrainConfig(steps=cfg.det_steps, seed=cfg.seed, log_every=max(cfg.det_steps // 5, 1)), log=log,
                device=device, dtype=dtype)
            secs = time.time() - t
            detector.save_detector(det, det_path)
            r = coco_map.evaluate(det, val_ds, crowd_json=coco.split_paths(root, "val")[0])
            det_json.write_text(json.dumps(dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"], seconds=round(secs, 1),
                                                per_category=r["per_category"]), indent=1))
            log(f"[detector] trained in {secs:.0f}s: val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f}")
        timing["detector"] = time.time() - t
    if det_json.is_file():
        summary["detector"] = coco.read_json(det_json)

    # -- attributes: [easy] / [hard] for every object from held-out-fold detectors (PAPER.md section 2)
    attr_path = out / "attributes.json"
    if "attributes" in run and cfg.attributes == "auto":
        t = time.time()
        if attr_path.is_file():
            log(f"[attributes] reusing {attr_path}")
        else:
            perception.make_attributes(root, out, perception.AttributeConfig(
                gamma=cfg.gamma, beta=cfg.beta, class_aware=cfg.class_aware, folds=cfg.attr_folds,
                image_size=cfg.det_size, min_area=cfg.min_area, max_objects=cfg.max_objects, steps=cfg.attr_steps,
                seed=cfg.seed), source=given, log=log,      # given=None: held-out folds of our own detector
                device=device, dtype=dtype)
        timing["attributes"] = time.time() - t
    if attr_path.is_file() and cfg.attributes == "auto":
        s = coco.read_json(attr_path)["summary"]["train"]
        summary["attributes"] = dict(hard_fraction=s["hard_fraction"],
                                     per_category={k: v["hard_fraction"] for k, v in s["per_category"].items()},
                                     per_nuisance={k: v["hard_fraction"] for k, v in s.get("per_nuisance", {}).items()},
                                     warning=s.get("warning"))

    # -- autoencoder (--space latent, or asked for by name): trained on the real images, then frozen
    ae_path = autoencoder.autoencoder_path(cfg, out)
    if "autoencoder" in run and (cfg.space == "latent" or cfg.stage == "autoencoder"):
        t = time.time()
        if ae_path.is_file():
            log(f"[autoencoder] reusing {ae_path}")
        elif cfg.autoencoder != "auto":
            raise SystemExit(f"error: {ae_path}: autoencoder not found")
        else:
            autoencoder.train_autoencoder(cfg, root, ae_path, log, device=device, dtype=dtype)
        timing["autoencoder"] = time.time() - t
    if cfg.space == "latent" and ae_path.is_file():
        f = config.load_file(ae_path)
        summary["autoencoder"] = {k: f.get(k) for k in ("psnr_val", "scale", "latent_shape", "seconds", "fingerprint")}

    # -- generator: the layout-conditioned UNet with the perception loss
    ckpt_path = out / "ckpt.pt"
    if "generator" in run:
        t = time.time()
        ck = config.load_file(ckpt_path) if ckpt_path.is_file() else None
        if ck is not None and ck.get("finished") and not cfg.resume:
            log(f"[generator] reusing {ckpt_path} (step {ck['step']})")
        else:
            logf.flush()
            train.train(cfg, mcfg_overrides)
        timing["generator"] = time.time() - t
    if ckpt_path.is_file():
        ck = config.load_file(ckpt_path)
        h = ck["history"]
        summary["generator"] = dict(steps=ck["step"], minutes=round(ck["elapsed"] / 60, 2), dtype=ck.get("dtype"),
                                    img_s=round(ck.get("img_s", 0.0), 1), finished=bool(ck.get("finished")),
                                    loss_last100=round(float(np.mean(h["loss"][-100:])), 4),
                                    l_p_last100=round(float(np.mean(h["l_p"][-100:])), 4) if h.get("l_p") else None)

    # -- grid: the same val layouts as origin / all-easy / all-hard, and a quick layout-fidelity check
    if "grid" in run:
        t = time.time()
        grid_path, fidelity_json = out / "easy_hard.png", out / "fidelity.json"
        if grid_path.is_file() and fidelity_json.is_file():
            log(f"[grid] reusing {grid_path}")
        else:
            for need in (ckpt_path,) if given is not None else (ckpt_path, det_path):
                if not need.is_file():
                    raise SystemExit(f"error: {need}: missing; run the stage that makes it first (--stage all)")
            model, tok, diff, ck = sample.load_checkpoint(ckpt_path, device=device)
            S, names = ck["train_cfg"]["image_size"], tok.class_names
            kw = dict(steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed, progress=False, dtype=sample_dtype,
                      autoencoder=autoencoder.checkpoint_autoencoder(ck, ckpt_path, device=device),
                      attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, ck))
            lays = sample.split_layouts(ck, max(cfg.n_grid, cfg.n_eval))
            real_ds = data.CocoLayoutDataset(root, "val", size=S, check_files=False)
            real = [real_ds.load(i)["image"] for i in range(len(lays))]
            t_s = time.time()
            origin = sample.generate_layouts(model, diff, tok, lays, S, **kw)
            sec_per_img = (time.time() - t_s) / len(lays)
            gen = dict(origin=origin, **{d: sample.generate_layouts(model, diff, tok, sample.with_difficulty(
                lays[:cfg.n_grid], d), S, **kw) for d in ("easy", "hard")})
            evaluate.easy_hard_figure(real, gen, lays, names, grid_path, n=cfg.n_grid)
            # layout fidelity (the paper's YOLO score, quick version; evaluate.py has the full one): the
            # real-trained detector on generated images vs on the real val images at the same resolution S
            det = given if given is not None else detector.load_detector(det_path).to(device)
            fidelity = dict(n_layouts=len(lays), sampler=f"ddim{cfg.sample_steps}", guidance=cfg.guidance,
                       sec_per_img=round(sec_per_img, 4))
            if isinstance(det, detections.ResultsFile):   # a results json has not seen the generated images
                sample.write_coco(out / "fidelity_generated", "val", origin, lays, names,
                                  ck["tokenizer"]["category_ids"])
                fidelity["note"] = (f"no fidelity score: {cfg.detector} is a results json; run that detector on "
                               f"{out / 'fidelity_generated'} and score it with `python perception.py eval --data "
                               f"{out / 'fidelity_generated'} --results YOURS.json`")
                log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); {fidelity['note']}")
            else:
                for name, ims in (("real", real), ("generated", origin)):
                    fidelity[name] = evaluate.detector_ap(det, ims, lays, names, ck["tokenizer"]["category_ids"],
                                                     out / f"fidelity_{name}", cfg.det_size, cfg.max_objects)
                log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); detector AP50 on {len(lays)} val "
                    f"layouts at {S}px: real {fidelity['real']['AP50']:.3f}, generated {fidelity['generated']['AP50']:.3f}; "
                    f"{sec_per_img:.3f} s per generated image")
            fidelity_json.write_text(json.dumps(fidelity, indent=1))
        timing["grid"] = time.time() - t
        if fidelity_json.is_file():
            summary["fidelity"] = coco.read_json(fidelity_json)

    # -- summary
    summary["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    summary["seconds"]["total"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(summary_text(summary))
    logf.close()
    if cfg.evaluate:                              # the paper's experiments on this run (evaluate.py)
        blind = ("fidelity", "easy_hard") if isinstance(given, detections.ResultsFile) else ()   # see evaluate.py
        summary["evaluate"] = evaluate.evaluate(out, evaluate.EvalConfig(
            parts=",".join(p for p in evaluate.PARTS if p not in blind), device=cfg.device, dtype=cfg.dtype))
    return summary


def summary_text(s):
    lines = [f"== summary of {s['run']} =="]
    if "detector" in s:
        d = s["detector"]
        lines.append(f"detector   val mAP {d['mAP']:.3f}  AP50 {d['AP50']:.3f}  AP75 {d['AP75']:.3f}  "
                     + (f"(given: {d['source']})" if d.get("source") else f"(trained in {d['seconds']:.0f}s)"))
    if "attributes" in s:
        a = s["attributes"]
        per = a["per_nuisance"] or a["per_category"]
        lines.append(f"attributes {100 * a['hard_fraction']:.1f}% hard; per {'nuisance' if a['per_nuisance'] else 'category'}"
                     ": " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per.items()))
        if a.get("warning"):
            lines.append(f"           {a['warning']}")
    if "autoencoder" in s:
        a = s["autoencoder"]
        lines.append(f"autoencoder latents {a['latent_shape']}, val PSNR {a['psnr_val']:.2f} dB, scale {a['scale']}, "
                     f"trained in {a['seconds']:.0f}s")
    if "generator" in s:
        g = s["generator"]
        lines.append(f"generator  {g['steps']} steps in {g['minutes']:.1f} min ({g['img_s']} img/s"
                     + (f", {g['dtype']}" if g.get("dtype") else "") + "), "
                     f"loss {g['loss_last100']}" + (f" (L_p {g['l_p_last100']})" if g["l_p_last100"] is not None
                                                     else " (no perception loss)") + " over the last 100 steps")
    if "fidelity" in s and "generated" not in s["fidelity"]:
        lines.append(f"fidelity   {s['fidelity']['note']}")
    elif "fidelity" in s:
        f = s["fidelity"]
        lines.append(f"fidelity   detector AP50 on {f['n_layouts']} val layouts: generated "
                     f"{f['generated']['AP50']:.3f} vs real {f['real']['AP50']:.3f} (mAP {f['generated']['mAP']:.3f}"
                     f" vs {f['real']['mAP']:.3f}); {f['sec_per_img']:.3f} s per image")
    lines.append("time       " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def main(argv=None):
    targs, margs = split_args(parse_flags(argv))
    if targs.get("resume"):
        out = Path(targs.get("out") or Path("runs") / Path(targs.get("data", "shapes")).name)
        ck_path = out / "ckpt.pt"
        if not ck_path.is_file():
            raise SystemExit(f"error: {ck_path}: no checkpoint to resume from")
        saved = config.load_file(ck_path)
        changed = {k: v for k, v in targs.items()
                   if k not in RESUME_OVERRIDES and saved["train_cfg"].get(k, getattr(TrainConfig, k)) != v}
        if changed or margs:
            raise SystemExit(f"error: --resume keeps the run's saved settings; these differ: "
                             f"{sorted(changed) + sorted(margs)} (only {sorted(RESUME_OVERRIDES)} may change)")
        targs = {**saved["train_cfg"], **targs, "out": str(out)}
    cfg = TrainConfig(**targs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun: the generator stage only, every rank trains
        if cfg.stage != "generator":
            raise SystemExit("error: under torchrun pass --stage generator (the other stages run in one process: "
                             "python detdiff.py --stage detector / attributes / grid)")
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            train.train(cfg, margs)
        else:
            pipeline(cfg, margs)
    except coco.DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
