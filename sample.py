"""Generating images and labelled data sets from a checkpoint: the sampling loop (DDPM ancestral sampling, DDIM,
DPM-Solver++ (2M); their update rules are diffusion.py's) with classifier-free guidance and the attribute guidance
that makes [easy] / [hard] show, and the COCO and YOLO folders a detector trains on.

The model is rebuilt from a checkpoint alone (its config, tokenizer and schedule settings travel inside it).

    python sample.py --ckpt runs/shapes/ckpt.pt                        # 16 val layouts, DDIM 50 steps, cfg 3
    python sample.py --ckpt runs/shapes/ckpt.pt --difficulty hard --n 64 --out runs/shapes/hard
    python sample.py --ckpt runs/shapes/ckpt.pt --layouts my_layouts.json --sampler ddpm

Outputs in a new --out folder (default: <checkpoint folder>/samples_<difficulty>), a COCO-format folder that
`--data OUT` and any detector read: OUT/train/NNNNN.png, OUT/annotations/instances_train.json (bbox [x, y, w, h]
in pixels of the generated S x S image, each object's "difficulty"; --split renames the split), the same images
for YOLO-family trainers in OUT/yolo/ (labels/train/NNNNN.txt "class cx cy w h" normalised, data.yaml), and
grid.png (the first 64 images with their boxes drawn, easy green and hard red).
Instance masks (`--masks head`, the default for a checkpoint with a perception head): each object's segmentation
is the perception head's mask, read off the same forward passes that draw the image: its sigmoid probability
averaged over the last --mask-steps sampling steps (small t, where x_t is nearly the finished image), above
--mask-threshold, inside the object's box; written as compressed COCO RLE (pycocotools decodes it), with
"mask": "head" on the annotation; masks.png shows the first 32 images beside their masks. An object whose mask comes out empty, and every object
with `--masks box`, gets its filled box as segmentation ("mask": "box").

Layout json (`--layouts`), COCO-style boxes in pixels of an image of the given size, category names as in the
training data; "difficulty" is optional ("none" | "easy" | "hard") and --difficulty easy|hard overrides it:
    {"layouts": [
       {"width": 640, "height": 480,
        "objects": [{"category": "circle", "bbox": [50, 40, 200, 150], "difficulty": "easy"},
                    {"category": "square", "bbox": [300, 200, 120, 120]}]},
       ...]}
"""
import argparse
import contextlib
import json
import pickle
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import autoencoder
import coco
import config
import crops
import data
import diffusion
import figures
import masks
import perception
from diffusion import ATTR_GUIDANCE, Diffusion, drop_attributes
from unet import UNet, UNetConfig


# ----------------------------------------------------------------------------------------------------------------
# Guidance and the sampling loop

def guided_eps(model, x_t, t, tokens, null_tokens, guidance, amp=None, attr_guidance=1.0, masks=False):
    """Classifier-free guidance: eps = eps(x, null) + s (eps(x, layout) - eps(x, null)) (Ho & Salimans Eq. 6),
    both prompts in one batched forward.

    attr_guidance w_d != 1 (beyond the paper) also guides on the attribute alone, with the layout's [none] version
    (`diffusion.drop_attributes`, which a run trains with --p-uncond-attr) as a third prediction:
        eps = eps(x, null) + s [(eps(x, layout [none]) - eps(x, null)) + w_d (eps(x, layout d) - eps(x, layout [none]))]
    InstructPix2Pix's two-condition guidance (Brooks et al., CVPR 2023, Eq. 3) with s_I = s and s_T = s w_d:
    w_d = 1 is the plain guidance above, w_d = 0 the guidance of the [none] prompt, w_d > 1 pushes every object
    further towards its [easy] / [hard]. All three predictions in one batched forward.
    masks=True also returns the perception head's mask probabilities of the layout's objects (B, M, h, w), read
    off the same forward (its conditional half)."""
    amp = amp or contextlib.nullcontext()
    plain = drop_attributes(tokens, 1.0) if attr_guidance != 1.0 else tokens            # layout, every attr [none]
    B = x_t.shape[0]
    if guidance == 1.0 and attr_guidance == 1.0:
        prompts = [tokens]
    elif attr_guidance == 1.0:
        prompts = [tokens, null_tokens.expand(B, -1)]
    else:
        prompts = [tokens, plain, null_tokens.expand(B, -1)]
    n = len(prompts)
    with amp:
        args = (torch.cat([x_t] * n), torch.cat([t] * n), torch.cat(prompts))
        out = model(*args, return_features=True) if masks else model(*args)
    e, aux = (out[0].float(), out[1]) if masks else (out.float(), None)
    if n == 1:
        eps = e
    elif n == 2:
        e_cond, e_null = e[:B], e[B:]
        eps = e_null + guidance * (e_cond - e_null)
    else:
        e_cond, e_plain, e_null = e[:B], e[B:2 * B], e[2 * B:]
        eps = e_null + guidance * ((e_plain - e_null) + attr_guidance * (e_cond - e_plain))
    return (eps, aux["mask_logits"][:B].float().sigmoid()) if masks else eps


SAMPLERS = ("ddim", "ddpm", "dpm++2m")
MASK_STEPS = 3          # exported masks: the head's probability averaged over the last 3 sampling steps (README:
                        # 1, 3 and 5 measured against the objects the images drew)


@torch.no_grad()
def generate(model, diff, tokens, null_tokens, size=None, steps=50, sampler="ddim", eta=0.0, guidance=3.0,
             generator=None, dtype="fp32", clip=True, progress=True, autoencoder=None, attr_guidance=1.0,
             mask_steps=0):
    """Sample images (B, C, S, S) in [-1, 1] for layout tokens (B, L). DDIM uses `steps` evenly spaced
    timesteps from T-1 down to 0, DPM-Solver++ (2M) `steps` timesteps uniform in log-SNR (`diffusion.logsnr_grid`); DDPM
    always walks all T steps. Noise comes from `generator` (CPU). A latent-space model (`autoencoder`, the frozen
    one it learned with) samples latents of side S / f without the [-1, 1] clipping of x_0 (latents are not
    bounded) and returns them decoded.
    mask_steps=k > 0: also the perception head's mask probability of every layout object (B, M, S, S), the mean
    over the last k sampling steps (small t, where x_t is nearly the finished image), upsampled from the latent
    side in latent mode: returns (images, masks)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    cfg, dev = model.cfg, tokens.device
    size = size or 32
    if autoencoder is not None:
        size, clip = size // autoencoder.cfg.factor, False
    B, was_training = tokens.shape[0], model.training
    model.eval()
    amp = config.autocast(dev, dtype)
    if attr_guidance != 1.0 and not bool(((tokens == diffusion.EASY_ID) | (tokens == diffusion.HARD_ID)).any()):
        attr_guidance = 1.0                 # no [easy] / [hard] to guide on: skip the third prediction (one sync)
    # the noise comes from the CPU generator, then moves: the same seed gives the same images on every device
    randn = lambda: torch.randn(B, cfg.in_channels, size, size, generator=generator).to(dev)  # noqa: E731
    x = randn()                                                                            # x_{T-1} ~ N(0, I)
    if sampler == "ddpm":
        ts = list(range(diff.T - 1, -1, -1))
    elif sampler == "ddim":
        ts = torch.linspace(diff.T - 1, 0, steps).round().long().unique_consecutive().tolist()
    else:
        ts = diffusion.logsnr_grid(diff, steps)
    x0_last = h_last = mask_sum = None                                                     # DPM-Solver++ history
    if mask_steps and model.mask_head is None:
        raise ValueError("mask_steps needs a model with a perception head (it was trained with --pal-weight 0)")
    for i, t_int in enumerate(tqdm(ts, disable=not progress, desc=f"{sampler} x{B}", leave=False)):
        t = torch.full((B,), t_int, dtype=torch.long, device=dev)
        if i >= len(ts) - mask_steps:                                                  # the last k steps
            eps, m = guided_eps(model, x, t, tokens, null_tokens, guidance, amp, attr_guidance, masks=True)
            mask_sum = m if mask_sum is None else mask_sum + m
        else:
            eps = guided_eps(model, x, t, tokens, null_tokens, guidance, amp, attr_guidance)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        if sampler == "ddpm":
            x = diffusion.ddpm_step(diff, x, t, eps, randn(), clip)
        elif sampler == "ddim":
            x = diffusion.ddim_step(diff, x, t, torch.full_like(t, t_prev), eps,
                                    randn() if eta > 0 else torch.zeros_like(x), eta, clip)
        else:
            x0, _ = diffusion.x0_and_eps(diff, x, t, eps, clip)
            x, h = diffusion.dpm2m_step(diff, x, t, t_prev, x0, x0_last, h_last)
            x0_last, h_last = x0, h
    model.train(was_training)
    x = autoencoder.decode(x.float()) if autoencoder is not None else x
    if not mask_steps:
        return x
    probs = mask_sum / min(mask_steps, len(ts))
    if probs.shape[-1] != x.shape[-1]:
        probs = F.interpolate(probs, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x, probs


def resolve_attr_guidance(w, ck):
    """w_d to sample a checkpoint with: w itself when >= 0; for -1 (auto) diffusion.ATTR_GUIDANCE when the run trained
    the [none] prediction (--p-uncond-attr > 0), else 1 (plain guidance)."""
    if w >= 0:
        return w
    return ATTR_GUIDANCE if ck["train_cfg"].get("p_uncond_attr", 0) > 0 else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, layouts, outputs

def load_checkpoint(path, weights="ema", device="cpu"):
    """A checkpoint alone -> (eval-mode model, tokenizer, diffusion, its dict); a bad file: a DataError naming it."""
    if not Path(path).is_file():
        raise coco.DataError(f"{path}: checkpoint not found")
    try:
        ck = config.load_file(path)
        side = Path(path).parent / Path(ck.get("attributes_used") or "-").name   # a sidecar moved with the checkpoint
        if ck.get("attributes_used") and not Path(ck["attributes_used"]).is_file() and side.is_file():
            ck["attributes_used"] = str(side)
        model = UNet(UNetConfig(**ck["model_cfg"]))
        model.load_state_dict(ck[weights])
        diff = Diffusion(ck["train_cfg"]["timesteps"], ck["train_cfg"]["schedule"]).to(device)
    except (KeyError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as e:
        why = " ".join(str(e).split())[:120]          # load_state_dict's message spans lines
        raise coco.DataError(f"{path}: not a detdiff checkpoint ({type(e).__name__}: {why})") from None
    return model.to(device).eval(), data.tokenizer_from(ck["tokenizer"]), diff, ck


def read_layouts(path, class_names, max_objects):
    """The user layout json (format in the module docstring) -> list of dict(boxes (N,4) in [0,1], labels, difficulty).
    Anything malformed is a one-line DataError naming the file, the layout, the object and the field."""
    js = coco.read_json(path)
    items = js.get("layouts") if isinstance(js, dict) else None
    if not isinstance(items, list) or not items:
        raise coco.DataError(f"{path}: expected {{\"layouts\": [...]}} with at least one layout")
    return [read_layout(path, i, lay, class_names, max_objects) for i, lay in enumerate(items)]


def read_layout(path, i, lay, class_names, max_objects):
    """Layout i of a layout json, checked field by field (read_layouts)."""
    where = f"{path}: layout {i}"
    if not isinstance(lay, dict):
        raise coco.DataError(f"{where}: expected an object with width, height and objects")
    for key in ("width", "height"):
        v = lay.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise coco.DataError(f"{where}: {key} must be a number > 0, got {v!r}")
    W, H, objs = float(lay["width"]), float(lay["height"]), lay.get("objects")
    if not isinstance(objs, list):
        raise coco.DataError(f"{where}: objects must be a list, got {objs!r}")
    if len(objs) > max_objects:
        raise coco.DataError(f"{where}: has {len(objs)} objects, the model takes at most {max_objects}")
    boxes, labels, diffs = [], [], []
    for j, o in enumerate(objs):
        at = f"{where} object {j}"
        if not isinstance(o, dict):
            raise coco.DataError(f"{at}: expected an object with category and bbox")
        if o.get("category") not in class_names:
            raise coco.DataError(f"{at}: unknown category {o.get('category')!r} (known: {', '.join(class_names)})")
        if o.get("difficulty", "none") not in data.DIFFICULTY:
            raise coco.DataError(f"{at}: difficulty must be one of {data.DIFFICULTY}")
        bb = o.get("bbox")
        if not isinstance(bb, list) or len(bb) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in bb):
            raise coco.DataError(f"{at}: bbox must be [x, y, width, height] in pixels, got {bb!r}")
        x, y, w, h = (float(v) for v in bb)
        b = [max(x, 0) / W, max(y, 0) / H, min(x + w, W) / W, min(y + h, H) / H]
        if b[2] <= b[0] or b[3] <= b[1]:
            raise coco.DataError(f"{at}: bbox {bb} is empty inside {W:g}x{H:g}")
        boxes.append(b)
        labels.append(class_names.index(o["category"]))
        diffs.append(data.DIFFICULTY.index(o.get("difficulty", "none")))
    return dict(boxes=torch.tensor(boxes).reshape(-1, 4), labels=torch.tensor(labels, dtype=torch.long),
                difficulty=torch.tensor(diffs, dtype=torch.long))


def split_layouts(ck, n, split="val"):
    """The first n layouts of the run's data split, with the attributes the run trained with ("origin")."""
    c = ck["train_cfg"]
    attrs = None
    if ck.get("attributes_used"):
        if not Path(ck["attributes_used"]).is_file():
            raise coco.DataError(f"{ck['attributes_used']}: the attribute sidecar this run trained with is missing "
                                 f"(restore it, or sample from a --layouts json)")
        side = coco.read_json(ck["attributes_used"])["attributes"]
        attrs = perception.load_attributes(ck["attributes_used"], split) if split in side else None
    ds = data.CocoLayoutDataset(data.resolve_data(c["data"]), split, size=c["image_size"], min_area=c["min_area"],
                                max_objects=c["max_objects"], attributes=attrs)
    return [{k: ds[i][k] for k in ("boxes", "labels", "difficulty")} for i in range(min(n, len(ds)))]


def write_coco(out, split, images, layouts, class_names, category_ids, masks=None):
    """A COCO-format folder any detector (and data.py's `--data OUT`) reads: OUT/SPLIT/NNNNN.png and
    OUT/annotations/instances_SPLIT.json. images: uint8 (S, S, 3) arrays, one per layout; masks (optional): one
    bool (n_objects, S, S) array per layout, written as compressed RLE (an empty mask falls back to the box)."""
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
        for k, ((x0, y0, x1, y1), c, d) in enumerate(zip((lay["boxes"] * S).tolist(), lay["labels"].tolist(),
                                                          lay["difficulty"].tolist())):
            a = dict(id=len(anns) + 1, image_id=i + 1, category_id=category_ids[c], iscrowd=0,
                     bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                     segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]], difficulty=data.DIFFICULTY[d])
            if masks is not None and masks[i][k].any():          # the perception head's mask of this object
                a.update(segmentation=coco.mask_to_rle(masks[i][k]), area=float(masks[i][k].sum()), mask="head")
            elif masks is not None:
                a["mask"] = "box"                                   # the head found nothing above the threshold
            anns.append(a)
    cats = [dict(id=i, name=n) for i, n in zip(category_ids, class_names)]
    return dict(images=images, annotations=anns, categories=cats)


def write_yolo(out, split, layouts, class_names):
    """The same images for YOLO-family trainers (ultralytics, YOLOv5/8 and kin): OUT/yolo/images/SPLIT/NNNNN.png
    (hard links to OUT/SPLIT's, copies where links fail), OUT/yolo/labels/SPLIT/NNNNN.txt with one line per
    object, "class cx cy w h", normalised to [0, 1], and OUT/yolo/data.yaml. Call after write_coco."""
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
    (y / "data.yaml").write_text(f"# generated by detdiff's sample.py; point val at your real validation images\n"
                                 f"path: {y.resolve()}\ntrain: images/{split}\nval: images/{split}\n"
                                 f"names:\n{names}")


def generate_layouts(model, diff, tok, layouts, size, steps=50, sampler="ddim", eta=0.0, guidance=3.0,
                     batch=32, seed=0, dtype="fp32", progress=True, autoencoder=None, attr_guidance=1.0,
                     mask_steps=0, mask_threshold=0.5):
    """Images (uint8 (S, S, 3) arrays) for a list of layouts dict(boxes, labels, difficulty), in batches.
    The noise stream depends only on `seed`, so the same layouts with other difficulty tokens start from the
    same x_T (the easy / hard comparison changes nothing but the prompt). mask_steps=k > 0: (images, masks),
    masks from `masks.object_masks` over the last k sampling steps."""
    dev = next(model.parameters()).device
    g, null, out, probs = torch.Generator().manual_seed(seed), tok.null_prompt().to(dev), [], []
    for s in tqdm(range(0, len(layouts), batch), desc="batches", disable=not progress):
        chunk = layouts[s:s + batch]
        tokens = torch.stack([tok.encode(l["boxes"], l["labels"], l["difficulty"]) for l in chunk]).to(dev)
        x = generate(model, diff, tokens, null, size, steps, sampler, eta, guidance, g, dtype, progress=False,
                     autoencoder=autoencoder, attr_guidance=attr_guidance, mask_steps=mask_steps)
        if mask_steps:
            x, m = x
            probs += list(m.cpu())
        out += [data.from_model_range(img) for img in x.cpu()]
    return (out, masks.object_masks(probs, layouts, mask_threshold)) if mask_steps else out


MODES = ("origin", "easy", "hard")    # a layout with its own attributes, every object [easy], every object [hard]


def with_difficulty(layouts, difficulty):
    """'origin' keeps each object's attribute; 'easy' / 'hard' give every object that token (PAPER.md s.2)."""
    if difficulty == "origin":
        return layouts
    code = data.DIFFICULTY.index(difficulty)
    return [dict(lay, difficulty=torch.full_like(lay["labels"], code)) for lay in layouts]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample layout-conditioned images from a detdiff checkpoint.")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="", help="a new folder (default: <checkpoint folder>/samples_<difficulty>)")
    ap.add_argument("--layouts", default="val", help="'val' (the run's validation split) or a layout json")
    ap.add_argument("--n", type=int, default=16, help="number of val layouts")
    ap.add_argument("--difficulty", choices=MODES, default="origin")
    ap.add_argument("--split", default="train", help="split name of the written COCO folder")
    ap.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    ap.add_argument("--steps", type=int, default=50, help="DDIM / DPM-Solver++ steps (DDPM always takes T)")
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--attr-guidance", type=float, default=-1.0,
                    help=f"w_d of the attribute guidance (guided_eps): 1 = plain classifier-free guidance, > 1 pushes "
                    f"each object further towards its [easy] / [hard]; wants a checkpoint trained with --p-uncond-attr. "
                    f"Default -1: {ATTR_GUIDANCE:g} for such a checkpoint, else 1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--dtype", choices=config.DTYPES, default="auto",
                    help="autocast dtype; auto: bf16 where the hardware has it (config.resolve_dtype), else fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autoencoder", default="", help="latent-space checkpoints: the autoencoder it learned with "
                    "(default: the path the checkpoint recorded, else autoencoder.pt beside it)")
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    ap.add_argument("--classifier", default="", help="a crop classifier (evaluate.py writes RUN/eval/"
                    "crop_classifier.pt): drop every generated image with an object it does not call the layout's "
                    "class (an object left in the image without its label would teach a detector it is background)")
    ap.add_argument("--min-prob", type=float, default=0.5, help="--classifier: keep an object when the "
                    "classifier gives its layout class at least this probability")
    ap.add_argument("--masks", choices=("auto", "head", "box"), default="auto", help="instance masks in the COCO "
                    "json: the perception head's (head), or the filled box (box); auto: head when the checkpoint has "
                    "a perception head")
    ap.add_argument("--mask-steps", type=int, default=MASK_STEPS, help="--masks head: average the head's mask "
                    "probability over this many last sampling steps")
    ap.add_argument("--mask-threshold", type=float, default=0.5, help="--masks head: a pixel belongs to the "
                    "object when the averaged probability is above this")
    a = ap.parse_args(argv)
    try:
        run(a)
    except coco.DataError as err:
        raise SystemExit(f"error: {err}") from None


def run(a):
    if a.n < 1 and a.layouts == "val":
        raise coco.DataError(f"--n must be at least 1, got {a.n}")
    out = Path(a.out or Path(a.ckpt).parent / f"samples_{a.difficulty}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} already exists and is not empty; choose a new --out")
    device, device_why = config.resolve_device(a.device)
    model, tok, diff, ck = load_checkpoint(a.ckpt, a.weights, device)
    a.attr_guidance = resolve_attr_guidance(a.attr_guidance, ck)
    ae = autoencoder.checkpoint_autoencoder(ck, a.ckpt, a.autoencoder, device)
    S, names = ck["train_cfg"]["image_size"], tok.class_names
    layouts = split_layouts(ck, a.n) if a.layouts == "val" else read_layouts(a.layouts, names, tok.max_objects)
    layouts = with_difficulty(layouts, a.difficulty)
    has_head = model.mask_head is not None
    if a.masks == "head" and not has_head:
        raise SystemExit(f"error: {a.ckpt}: --masks head needs a perception head, and this checkpoint has none "
                         f"(trained with --pal-weight 0); use --masks box")
    mask_steps = a.mask_steps if (a.masks == "head" or (a.masks == "auto" and has_head)) else 0
    if mask_steps < 0 or (a.masks == "head" and mask_steps == 0):
        raise SystemExit(f"error: --mask-steps must be >= 1 for the perception head's masks, got {a.mask_steps}")
    t0 = time.time()
    dtype, why = config.resolve_dtype(a.dtype, device)
    print(f"sampling {len(layouts)} layouts with {a.sampler}, guidance {a.guidance:g}, attribute guidance "
          f"{a.attr_guidance:g}, device {device} ({device_why}), dtype {dtype} ({why})")
    if a.attr_guidance != 1.0 and not ck["train_cfg"].get("p_uncond_attr", 0):
        print(f"warning: {a.ckpt} was trained without attribute-only dropout (--p-uncond-attr 0), so its [none] "
              f"prediction, which --attr-guidance {a.attr_guidance:g} steers from, is untrained")
    images = generate_layouts(model, diff, tok, layouts, S, a.steps, a.sampler, a.eta, a.guidance, a.batch, a.seed,
                              dtype, autoencoder=ae, attr_guidance=a.attr_guidance, mask_steps=mask_steps,
                              mask_threshold=a.mask_threshold)
    images, obj_masks = images if mask_steps else (images, None)
    secs = time.time() - t0
    dropped = ""
    if a.classifier:                                   # class consistency filter (evaluate.py, part 6)
        clf = crops.load_crop_classifier(a.classifier).to(device)
        if tuple(clf.class_names) != tuple(names):
            raise SystemExit(f"error: {a.classifier}: classes {', '.join(clf.class_names)} are not the "
                             f"checkpoint's ({', '.join(names)})")
        ok = [bool(k.all()) for k in crops.accept_objects(clf, images, layouts, a.min_prob)]
        dropped = f" ({ok.count(False)} of {len(ok)} dropped by the class filter)"
        images, layouts = [i for i, k in zip(images, ok) if k], [lay for lay, k in zip(layouts, ok) if k]
        obj_masks = [m for m, k in zip(obj_masks, ok) if k] if obj_masks is not None else None
        if not images:
            raise SystemExit(f"error: the class filter ({a.classifier}, --min-prob {a.min_prob}) dropped every "
                             f"image; nothing written")
    ids = ck["tokenizer"].get("category_ids") or list(range(1, len(names) + 1))
    js = write_coco(out, a.split, images, layouts, names, ids, obj_masks)
    write_yolo(out, a.split, layouts, names)
    tiles = [figures.draw_layout(im, l["boxes"], l["labels"], names, l["difficulty"]) for im, l in zip(images[:64], layouts)]
    figures.image_grid(tiles, ncol=min(8, len(tiles))).save(out / "grid.png")
    how = "filled boxes as masks"
    if obj_masks is not None:
        pair = [[figures.draw_layout(im, l["boxes"], l["labels"], names),
                 figures.draw_layout(masks.mask_picture(m, im.shape[0]), l["boxes"], l["labels"], names)]
                for im, m, l in zip(images[:32], obj_masks, layouts)]
        tiles = [figures.image_grid(p, ncol=2, pad=0) for p in pair]
        figures.image_grid(tiles, ncol=min(4, len(tiles)), pad=4).save(out / "masks.png")   # image | its masks
        n_box = sum(x.get("mask") == "box" for x in js["annotations"])
        how = (f"the perception head's masks (last {mask_steps} steps, > {a.mask_threshold:g}; {n_box} of "
               f"{len(js['annotations'])} empty, given their box) in masks.png")
    print(f"wrote {len(images)} images ({secs / len(ok if a.classifier else images):.3f} s each){dropped} as a COCO "
          f"folder ({a.split} split, {how}), a YOLO folder (yolo/data.yaml) and grid.png to {out}")


if __name__ == "__main__":
    main()
