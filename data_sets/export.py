"""Generated data sets: images generated for layouts, written as the COCO and YOLO folders a
detector trains on, and the command line of `python sample.py` (sample.py holds the sampling
itself).

    python sample.py --ckpt runs/shapes/ckpt.pt                        # 16 val layouts into RUN/samples_origin
    python sample.py --ckpt runs/shapes/ckpt.pt --difficulty hard --n 64 --out runs/shapes/hard
    python sample.py --ckpt runs/shapes/ckpt.pt --layouts my_layouts.json --sampler ddpm

Outputs in a new --out folder (default: <checkpoint folder>/samples_<difficulty>), a COCO-format
folder that `--data OUT` and any detector read: OUT/train/NNNNN.png,
OUT/annotations/instances_train.json (bbox [x, y, w, h] in pixels of the generated S x S image, each
object's "difficulty"; --split renames the split), the same images for YOLO-family trainers in
OUT/yolo/ (labels/train/NNNNN.txt "class cx cy w h" normalised, data.yaml), and grid.png (the first
64 images with their boxes drawn, easy green and hard red). Instance masks (`--masks head`, the
default for a checkpoint with a perception head): each object's segmentation is the perception
head's mask, read off the same forward passes that draw the image: its sigmoid probability averaged
over the last --mask-steps sampling steps (small t, where x_t is nearly the finished image), above
--mask-threshold, inside the object's box; written as compressed COCO RLE (pycocotools decodes it),
with "mask": "head" on the annotation; masks.png shows the first 32 images beside their masks. An
object whose mask comes out empty, and every object with `--masks box`, gets its filled box as
segmentation ("mask": "box").

Layout json (`--layouts`), COCO-style boxes in pixels of an image of the given size, category names
as in the training data; "difficulty" is optional ("none" | "easy" | "hard") and --difficulty
easy|hard overrides it:
    {"layouts": [
       {"width": 640, "height": 480,
        "objects": [{"category": "circle", "bbox": [50, 40, 200, 150], "difficulty": "easy"},
                    {"category": "square", "bbox": [300, 200, 120, 120]}]},
       ...]}
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from PIL import Image

import autoencoder
import config
import data
import sample
from config import DataError
from data_sets import coco, shapes
from experiments import crops, masks
from sample import ATTR_GUIDANCE, MASK_STEPS, MODES, SAMPLERS


# --------------------------------------------------------------------------------------------------
# Layouts in, data sets out


def read_layouts(path, class_names, max_objects):
    """The user layout json (format in the module docstring) -> list of dict(boxes (N,4) in [0,1],
    labels, difficulty). Anything malformed is a one-line DataError naming the file, the layout, the
    object and the field."""
    js = config.read_json(path)
    items = js.get("layouts") if isinstance(js, dict) else None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected {{\"layouts\": [...]}} with at least one layout")
    return [read_layout(path, i, lay, class_names, max_objects) for i, lay in enumerate(items)]


def read_layout(path, i, lay, class_names, max_objects):
    """Layout i of a layout json, checked field by field (read_layouts)."""
    where = f"{path}: layout {i}"
    if not isinstance(lay, dict):
        raise DataError(f"{where}: expected an object with width, height and objects")
    for key in ("width", "height"):
        v = lay.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise DataError(f"{where}: {key} must be a number > 0, got {v!r}")
    W, H, objs = float(lay["width"]), float(lay["height"]), lay.get("objects")
    if not isinstance(objs, list):
        raise DataError(f"{where}: objects must be a list, got {objs!r}")
    if len(objs) > max_objects:
        raise DataError(f"{where}: has {len(objs)} objects, the model takes at most {max_objects}")
    boxes, labels, diffs = [], [], []
    for j, o in enumerate(objs):
        at = f"{where} object {j}"
        if not isinstance(o, dict):
            raise DataError(f"{at}: expected an object with category and bbox")
        if o.get("category") not in class_names:
            raise DataError(f"{at}: unknown category {o.get('category')!r} (known: "
                            f"{', '.join(class_names)})")
        if o.get("difficulty", "none") not in data.DIFFICULTY:
            raise DataError(f"{at}: difficulty must be one of {data.DIFFICULTY}")
        bb = o.get("bbox")
        if (
            not isinstance(bb, list)
            or len(bb) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)
        ):
            raise DataError(f"{at}: bbox must be [x, y, width, height] in pixels, got {bb!r}")
        x, y, w, h = (float(v) for v in bb)
        b = [max(x, 0) / W, max(y, 0) / H, min(x + w, W) / W, min(y + h, H) / H]
        if b[2] <= b[0] or b[3] <= b[1]:
            raise DataError(f"{at}: bbox {bb} is empty inside {W:g}x{H:g}")
        boxes.append(b)
        labels.append(class_names.index(o["category"]))
        diffs.append(data.DIFFICULTY.index(o.get("difficulty", "none")))
    return dict(boxes=torch.tensor(boxes).reshape(-1, 4),
                labels=torch.tensor(labels, dtype=torch.long),
                difficulty=torch.tensor(diffs, dtype=torch.long))


def write_coco(out, split, images, layouts, class_names, category_ids, masks=None):
    """A COCO-format folder any detector (and data.py's `--data OUT`) reads: OUT/SPLIT/NNNNN.png and
    OUT/annotations/instances_SPLIT.json. images: uint8 (S, S, 3) arrays, one per layout; masks
    (optional): one bool (n_objects, S, S) array per layout, written as compressed RLE (an empty
    mask falls back to the box)."""
    out = Path(out)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    for i, arr in enumerate(images):
        Image.fromarray(arr).save(out / split / f"{i:05d}.png")
    js = coco_json(layouts, images[0].shape[0], class_names, category_ids, masks)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(js))
    return js


def coco_json(layouts, S, class_names, category_ids, masks=None):
    images, anns = [], []
    for i, lay in enumerate(layouts):
        images.append(dict(id=i + 1, file_name=f"{i:05d}.png", width=S, height=S))
        for k, ((x0, y0, x1, y1), c,
                d) in enumerate(zip((lay["boxes"] * S).tolist(), lay["labels"].tolist(),
                                                          lay["difficulty"].tolist())):
            a = dict(id=len(anns) + 1, image_id=i + 1, category_id=category_ids[c], iscrowd=0,
                     bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                     segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]], difficulty=data.DIFFICULTY[d])
            if masks is not None and masks[i][k].any():  # the perception head's mask of this object
                a.update(segmentation=coco.mask_to_rle(masks[i][k]), area=float(masks[i][k].sum()),
                         mask="head")
            elif masks is not None:
                a["mask"] = "box"                       # the head found nothing above the threshold
            anns.append(a)
    cats = [dict(id=i, name=n) for i, n in zip(category_ids, class_names)]
    return dict(images=images, annotations=anns, categories=cats)


def write_yolo(out, split, layouts, class_names):
    """The same images for YOLO-family trainers (ultralytics, YOLOv5/8 and kin):
    OUT/yolo/images/SPLIT/NNNNN.png (hard links to OUT/SPLIT's, copies where links fail),
    OUT/yolo/labels/SPLIT/NNNNN.txt with one line per object, "class cx cy w h", normalised to [0,
    1], and OUT/yolo/data.yaml. Call after write_coco."""
    out, y = Path(out), Path(out) / "yolo"
    for sub in ("images", "labels"):
        (y / sub / split).mkdir(parents=True, exist_ok=True)
    for i, lay in enumerate(layouts):
        src, dst = out / split / f"{i:05d}.png", y / "images" / split / f"{i:05d}.png"
        try:
            dst.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)
        rows = [f"{c} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"
                for (x0, y0, x1, y1), c in zip(lay["boxes"].tolist(), lay["labels"].tolist())]
        (y / "labels" / split / f"{i:05d}.txt").write_text("".join(r + "\n" for r in rows))
    names = "".join(f"  {k}: {json.dumps(n)}\n" for k, n in enumerate(class_names))
    (y / "data.yaml").write_text(f"# generated by detdiff's sample.py; point val at your real "
                                 f"validation images\npath: {y.resolve()}\ntrain: "
                                 f"images/{split}\nval: images/{split}\nnames:\n{names}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python sample.py",
                                 description="Sample layout-conditioned images from a detdiff "
                                             "checkpoint.")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="",
                    help="a new folder (default: <checkpoint folder>/samples_<difficulty>)")
    ap.add_argument("--layouts", default="val",
                    help="'val' (the run's validation split) or a layout json")
    ap.add_argument("--n", type=int, default=16, help="number of val layouts")
    ap.add_argument("--difficulty", choices=MODES, default="origin")
    ap.add_argument("--split", default="train", help="split name of the written COCO folder")
    ap.add_argument("--sampler", choices=SAMPLERS, default=sample.SAMPLER)
    ap.add_argument("--steps", type=int, default=sample.STEPS,
                    help="DDIM / DPM-Solver++ steps (DDPM always takes T)")
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--attr-guidance", type=float, default=-1.0,
                    help=f"w_d of the attribute guidance (guided_eps): 1 = plain classifier-free "
                         f"guidance, > 1 pushes each object further towards its [easy] / [hard]; "
                         f"wants a checkpoint trained with --p-uncond-attr. Default -1: "
                         f"{ATTR_GUIDANCE:g} for such a checkpoint, else 1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--dtype", choices=config.DTYPES, default="auto",
                    help="autocast dtype; auto: bf16 where the hardware has it "
                         "(config.resolve_dtype), else fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autoencoder", default="",
                    help="latent-space checkpoints: the autoencoder it learned with "
                    "(default: the path the checkpoint recorded, else autoencoder.pt beside it)")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    ap.add_argument("--classifier", default="",
                    help="a crop classifier (python -m experiments.evaluate writes RUN/eval/"
                    "crop_classifier.pt): drop every generated image with an object it does not "
                    "call the layout's class (an object left in the image without its label would "
                    "teach a detector it is background)")
    ap.add_argument("--min-prob", type=float, default=0.5,
                    help="--classifier: keep an object when the "
                    "classifier gives its layout class at least this probability")
    ap.add_argument("--masks", choices=("auto", "head", "box"), default="auto",
                    help="instance masks in the COCO "
                    "json: the perception head's (head), or the filled box (box); auto: head when "
                    "the checkpoint has a perception head")
    ap.add_argument("--mask-steps", type=int, default=MASK_STEPS,
                    help="--masks head: average the head's mask "
                    "probability over this many last sampling steps")
    ap.add_argument("--mask-threshold", type=float, default=0.5,
                    help="--masks head: a pixel belongs to the "
                    "object when the averaged probability is above this")
    a = ap.parse_args(argv)
    try:
        run(a)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None


def run(a):
    if a.n < 1 and a.layouts == "val":
        raise DataError(f"--n must be at least 1, got {a.n}")
    out = Path(a.out or Path(a.ckpt).parent / f"samples_{a.difficulty}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} already exists and is not empty; choose a new --out")
    device, device_why = config.resolve_device(a.device)
    model, tok, diff, ck = sample.load_checkpoint(a.ckpt, a.weights, device)
    a.attr_guidance = sample.resolve_attr_guidance(a.attr_guidance, ck)
    ae = autoencoder.checkpoint_autoencoder(ck, a.ckpt, a.autoencoder, device)
    S, names = ck["train_cfg"]["image_size"], tok.class_names
    if a.layouts == "val":
        shapes.build_if_missing(ck["train_cfg"]["data"])     # the embedded set is made on first use
        layouts = sample.split_layouts(ck, a.n)
    else:
        layouts = read_layouts(a.layouts, names, tok.max_objects)
    layouts = sample.with_difficulty(layouts, a.difficulty)
    has_head = model.mask_head is not None
    if a.masks == "head" and not has_head:
        raise SystemExit(f"error: {a.ckpt}: --masks head needs a perception head, and this "
                         f"checkpoint has none (trained with --pal-weight 0); use --masks box")
    mask_steps = a.mask_steps if (a.masks == "head" or (a.masks == "auto" and has_head)) else 0
    if mask_steps < 0 or (a.masks == "head" and mask_steps == 0):
        raise SystemExit(f"error: --mask-steps must be >= 1 for the perception head's masks, got "
                         f"{a.mask_steps}")
    t0 = time.time()
    dtype, why = config.resolve_dtype(a.dtype, device)
    print(f"sampling {len(layouts)} layouts with {a.sampler}, guidance {a.guidance:g}, attribute "
          f"guidance {a.attr_guidance:g}, device {device} ({device_why}), dtype {dtype} ({why})")
    if a.attr_guidance != 1.0 and not ck["train_cfg"].get("p_uncond_attr", 0):
        print(f"warning: {a.ckpt} was trained without attribute-only dropout (--p-uncond-attr 0), "
              f"so its [none] prediction, which --attr-guidance {a.attr_guidance:g} steers from, "
              f"is untrained")
    images = sample.generate_layouts(model, diff, tok, layouts, S, a.steps, a.sampler, a.eta,
                                     a.guidance, a.batch, a.seed,
                              dtype, autoencoder=ae, attr_guidance=a.attr_guidance,
                                     mask_steps=mask_steps,
                              mask_threshold=a.mask_threshold)
    images, obj_masks = images if mask_steps else (images, None)
    secs = time.time() - t0
    dropped = ""
    if a.classifier:                                   # class consistency (experiments/crops.py)
        clf = crops.load_crop_classifier(a.classifier).to(device)
        if tuple(clf.class_names) != tuple(names):
            raise SystemExit(f"error: {a.classifier}: classes {', '.join(clf.class_names)} are not "
                             f"the checkpoint's ({', '.join(names)})")
        ok = [bool(k.all()) for k in crops.accept_objects(clf, images, layouts, a.min_prob)]
        dropped = f" ({ok.count(False)} of {len(ok)} dropped by the class filter)"
        images, layouts = [i for i, k in zip(images, ok) if k], [
            lay for lay, k in zip(layouts, ok) if k
        ]
        obj_masks = [m for m, k in zip(obj_masks, ok) if k] if obj_masks is not None else None
        if not images:
            raise SystemExit(f"error: the class filter ({a.classifier}, --min-prob {a.min_prob}) "
                             f"dropped every image; nothing written")
    ids = ck["tokenizer"].get("category_ids") or list(range(1, len(names) + 1))
    js = write_coco(out, a.split, images, layouts, names, ids, obj_masks)
    write_yolo(out, a.split, layouts, names)
    tiles = [data.draw_layout(im, l["boxes"], l["labels"], names, l["difficulty"]) for im,
             l in zip(images[:64], layouts)]
    data.image_grid(tiles, ncol=min(8, len(tiles))).save(out / "grid.png")
    how = "filled boxes as masks"
    if obj_masks is not None:
        pair = [[data.draw_layout(im, l["boxes"], l["labels"], names),
                 data.draw_layout(masks.mask_picture(m, im.shape[0]), l["boxes"], l["labels"],
                                  names)]
                for im, m, l in zip(images[:32], obj_masks, layouts)]
        tiles = [data.image_grid(p, ncol=2, pad=0) for p in pair]
        # image | its masks
        data.image_grid(tiles, ncol=min(4, len(tiles)), pad=4).save(out / "masks.png")
        n_box = sum(x.get("mask") == "box" for x in js["annotations"])
        how = (f"the perception head's masks (last {mask_steps} steps, > {a.mask_threshold:g}; "
               f"{n_box} of {len(js['annotations'])} empty, given their box) in masks.png")
    print(f"wrote {len(images)} images ({secs / len(ok if a.classifier else images):.3f} s "
          f"each){dropped} as a COCO folder ({a.split} split, {how}), a YOLO folder "
          f"(yolo/data.yaml) and grid.png to {out}")
