"""Data for detdiff: the model's view of a COCO-format folder, and layout tokenization.

DetDiffusion (PAPER.md sections 1-2) conditions a diffusion model on a layout written as text,
"An image with {objects}", one object = (category c, location l, perception-aware attribute d).
This file owns everything between a data set on disk (read by `coco.py`) and that token sequence:

  1. pixels:   `to_model_range` / `from_model_range`, the one place pixels map to [-1, 1] and back, and
               `box_pixels`, the one rule for which pixels lie in a box
  2. reader:   `CocoLayoutDataset` (resize to S x S, drop objects under 2% of the image, cap objects per image
               keeping the largest, shuffle object order) and `collate`
  3. tokens:   `LayoutTokenizer` (GeoDiffusion's location grid, category and [easy]/[hard] tokens)
  4. names:    `resolve_data`: `shapes` (the embedded set, `shapes.py`, built on first use), `coco_subset`
               (`coco_subset.py`) or a folder

Commands (`python data.py --help`):
  python data.py shapes                         # writes data/shapes (a few seconds)
  python data.py show --data shapes             # docs/shapes_grid.png: 16 images with their boxes
  python data.py coco-subset --coco /path/coco  # writes data/coco_subset from a local COCO 2017 copy

The loader only reads the user's folder; it never writes into it.
"""
import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import coco
import coco_subset
import figures
import shapes

log = logging.getLogger("detdiff.data")
DATA_DIR = Path(__file__).resolve().parent / "data"
DIFFICULTY = ("none", "easy", "hard")  # code 0 = no attribute yet, 1 = [easy], 2 = [hard]


# ----------------------------------------------------------------------------------------------
# 1. Pixels: the only place images map to the model's [-1, 1] and back, and the one pixel-in-box rule.

def to_model_range(image):
    """uint8 (H, W, 3) array or PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"to_model_range wants uint8 (H, W, 3), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def from_model_range(x):
    """float tensor (3, H, W) in [-1, 1] -> uint8 (H, W, 3) numpy array (values outside are clipped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"from_model_range wants (3, H, W), got {tuple(x.shape)}")
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(1, 2, 0).numpy()


def box_spans(boxes, S, grow=0):
    """The one pixel-in-box rule of the project: on an S x S grid, pixel (i, j) belongs to a box when its centre
    ((j + 0.5) / S, (i + 0.5) / S) lies in [x0, x1) x [y0, y1): the left and top edges in, the right and bottom
    edges out, so boxes that share an edge share no pixel. boxes (..., 4) xyxy in [0, 1]; grow: pixels added on
    every side. -> centres (S,), in_x (..., S), in_y (..., S) (the box's columns and rows)."""
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    c = (torch.arange(S, device=boxes.device, dtype=dt) + 0.5) / S
    x0, y0, x1, y1 = (boxes[..., i, None].to(dt) for i in range(4))      # (..., 1)
    g = grow / S
    return c, (c >= x0 - g) & (c < x1 + g), (c >= y0 - g) & (c < y1 + g)


def flip_boxes(boxes):
    """Boxes (..., 4) xyxy in [0, 1] of an image mirrored left-right: (1 - x1, y0, 1 - x0, y1)."""
    return torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)


def box_pixels(boxes, S, grow=0):
    """bool (..., S, S): the pixels of each box under box_spans' rule. boxes (..., 4) xyxy in [0, 1]."""
    _, in_x, in_y = box_spans(torch.as_tensor(boxes), S, grow)
    return in_y[..., :, None] & in_x[..., None, :]


# ----------------------------------------------------------------------------------------------
# 2. The reader: a COCO-format split as images at S x S with their layouts.


class CocoLayoutDataset(torch.utils.data.Dataset):
    """Images resized to S x S with their layouts, the model's view of a COCO-format folder.

    Layout filtering as in PAPER.md section 1: objects whose box covers less than `min_area` of the image
    are dropped, and at most `max_objects` are kept (the largest). `attributes` maps annotation id to
    'easy' / 'hard' (the perception-aware attribute, kept in a sidecar file, never in the user's data).
    """

    def __init__(self, root, split="train", size=32, min_area=0.02, max_objects=8, attributes=None,
                 shuffle_objects=False, tokenizer=None, check_files=True):
        json_path, image_dir = coco.split_paths(root, split)
        self.class_names, self.category_ids, self.records, self.stats = coco.load_coco(json_path, image_dir,
                                                                                       check_files)
        if tokenizer is not None and tokenizer.max_objects < max_objects:
            raise ValueError(f"tokenizer holds {tokenizer.max_objects} objects, dataset keeps {max_objects}")
        self.size, self.max_objects, self.tokenizer = size, max_objects, tokenizer
        self.attributes = {int(k): v for k, v in (attributes or {}).items()}
        self.shuffle_objects = shuffle_objects
        self.stats["dropped_small"] = self.stats["dropped_cap"] = 0
        self.keep = []  # per image: indices of the objects that survive filtering
        for rec in self.records:
            W, H = rec["width"], rec["height"]
            area = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) / (W * H) for o in rec["objects"]]
            big = [i for i in np.argsort(area, kind="stable")[::-1] if area[i] >= min_area]
            self.stats["dropped_small"] += len(area) - len(big)
            self.stats["dropped_cap"] += max(0, len(big) - max_objects)
            self.keep.append(sorted(big[:max_objects]))
        log.info("%s/%s: %d images, %d objects kept, %d under %.0f%% area dropped, %d over the cap of %d dropped",
                 Path(root).name, split, len(self.records), sum(map(len, self.keep)),
                 self.stats["dropped_small"], 100 * min_area, self.stats["dropped_cap"], max_objects)
        self._cache = {}

    def __len__(self):
        return len(self.records)

    def load(self, i):
        """Image i resized to S x S: uint8 image (S, S, 3), boxes (N, 4) in [0, 1], labels, masks (N, S, S)."""
        if i in self._cache:
            return self._cache[i]
        rec, S = self.records[i], self.size
        W, H = rec["width"], rec["height"]
        image = coco.open_rgb(rec["file"])
        if image.size != (W, H):
            raise coco.DataError(f"{rec['file']}: json says {W}x{H}, the file is {image.size[0]}x{image.size[1]}")
        image = np.asarray(image.resize((S, S), Image.BICUBIC, reducing_gap=None) if (W, H) != (S, S) else image)
        objs = [rec["objects"][k] for k in self.keep[i]]
        boxes = np.array([o["box"] for o in objs], np.float32).reshape(-1, 4) / np.array([W, H, W, H], np.float32)
        masks = np.zeros((len(objs), S, S), bool)
        for k, o in enumerate(objs):
            seg = o["segmentation"]
            if isinstance(seg, list):  # polygons: scale the vertices, rasterise at S (exact, cheap)
                scaled = [np.asarray(p) * np.tile([S / W, S / H], len(p) // 2) for p in seg]
                masks[k] = coco.polygon_to_mask(scaled, S, S)
            elif isinstance(seg, dict):  # RLE: decode at full size, area-resize like the pixels
                try:
                    m = coco.rle_to_mask(seg)
                except (ValueError, KeyError, TypeError) as e:
                    raise coco.DataError(f"{rec['file']}: annotation {o['ann_id']} has a bad RLE ({e})") from None
                masks[k] = coco.resize_mask(m, S)
            else:  # no segmentation: the filled box is the mask
                masks[k] = coco.polygon_to_mask([[b * S for b in boxes[k][[0, 1, 2, 1, 2, 3, 0, 3]]]], S, S)
        item = dict(image=image, boxes=boxes, labels=np.array([o["label"] for o in objs], np.int64),
                    masks=masks, ann_ids=np.array([o["ann_id"] for o in objs], np.int64))
        self._cache[i] = item
        return item

    def __getitem__(self, i):
        it = self.load(i)
        n = len(it["labels"])
        order = torch.randperm(n) if self.shuffle_objects else torch.arange(n)  # PAPER.md s.1: shuffle objects
        difficulty = [DIFFICULTY.index(self.attributes.get(int(a), "none")) for a in it["ann_ids"]]
        out = dict(image=to_model_range(it["image"]),
                   boxes=torch.from_numpy(it["boxes"])[order].reshape(-1, 4),
                   labels=torch.from_numpy(it["labels"])[order],
                   difficulty=torch.tensor(difficulty, dtype=torch.long)[order].reshape(-1),
                   masks=torch.from_numpy(it["masks"]).float()[order].reshape(-1, self.size, self.size),
                   ann_ids=torch.from_numpy(it["ann_ids"])[order], image_id=self.records[i]["image_id"])
        if self.tokenizer is not None:
            out["tokens"] = self.tokenizer.encode(out["boxes"], out["labels"], out["difficulty"])
        return out


def collate(items, max_objects=None):
    """Pad the objects of a batch to M = max_objects (default: the largest count in the batch)."""
    B = len(items)
    M = max_objects or max(1, max(len(it["labels"]) for it in items))
    S = items[0]["image"].shape[-1]
    out = dict(image=torch.stack([it["image"] for it in items]), boxes=torch.zeros(B, M, 4),
               labels=torch.zeros(B, M, dtype=torch.long), difficulty=torch.zeros(B, M, dtype=torch.long),
               masks=torch.zeros(B, M, S, S), valid=torch.zeros(B, M, dtype=torch.bool),
               ann_ids=torch.full((B, M), -1, dtype=torch.long),
               image_id=torch.tensor([it["image_id"] for it in items]))
    for b, it in enumerate(items):
        n = len(it["labels"])
        if n > M:
            raise ValueError(f"item {b} has {n} objects, more than max_objects={M}")
        for k in ("boxes", "labels", "difficulty", "masks", "ann_ids"):
            out[k][b, :n] = it[k]
        out["valid"][b, :n] = True
    if "tokens" in items[0]:
        out["tokens"] = torch.stack([it["tokens"] for it in items])
    return out


def make_loader(dataset, batch_size, shuffle=True, num_workers=0, drop_last=True, sampler=None):
    """A DataLoader with the dataset's fixed object count (works with 0 or more workers)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
        collate_fn=partial(collate, max_objects=dataset.max_objects))


# ----------------------------------------------------------------------------------------------
# 3. Layout tokens: "An image with {objects}", an object = (c, l, d) (PAPER.md section 1).
# A point (x, y) in [0, 1] is quantised as GeoDiffusion does: index = round(y (n-1)) n + round(x (n-1)),
# so decoding x = ix / (n-1) is within half a bin, 1 / (2 (n-1)). location="axis" uses separate x and y
# tokens (2n of them) instead of n^2 grid tokens. Every object fills a fixed slot of T tokens, which lets
# the layout encoder pool one embedding per object.

def object_slots(ids, layout):
    """ids (B, L) -> slots (B, M, T) and valid (B, M): slot k holds object k's T tokens, and it is a real object
    when its first token is a category. `layout` is anything that carries the token layout (a LayoutTokenizer or
    the UNet's config): max_objects, tokens_per_object, class_offset, loc_offset."""
    M, T = layout.max_objects, layout.tokens_per_object
    slots = ids[:, 1:1 + M * T].reshape(ids.shape[0], M, T)
    c = slots[..., 0]
    return slots, (c >= layout.class_offset) & (c < layout.loc_offset)


def slot_boxes(slots, layout):
    """slots (..., T) -> boxes (..., 4) xyxy in [0, 1]: the location tokens read back to their bin centres, the
    inverse of LayoutTokenizer.encode (within half a bin). A slot with no object gives a junk box; mask it with
    object_slots' valid. `layout` also carries bins, location."""
    n, T = layout.bins, slots.shape[-1]
    loc = (slots[..., 1:T - 1] - layout.loc_offset).clamp(min=0)   # (..., 2) grid, (..., 4) axis
    if layout.location == "grid":                                  # index = y n + x
        q = torch.stack([loc % n, loc // n], -1).flatten(-2)       # (..., 4) x0, y0, x1, y1
    else:                                                          # x tokens 0..n-1, y tokens n..2n-1
        q = loc - torch.tensor([0, n, 0, n], device=slots.device)
    return q.float() / (n - 1)


class LayoutTokenizer:
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<null>", "[none]", "[easy]", "[hard]")

    def __init__(self, class_names, bins=32, max_objects=8, location="grid"):
        if location not in ("grid", "axis"):
            raise ValueError(f"location must be 'grid' or 'axis', got {location!r}")
        if bins < 2:
            raise ValueError("bins must be at least 2")
        self.class_names, self.bins, self.max_objects, self.location = list(class_names), bins, max_objects, location
        self.pad_id, self.bos_id, self.eos_id, self.null_id = 0, 1, 2, 3
        self.diff_offset = 4                                   # [none], [easy], [hard] = 4, 5, 6
        self.class_offset = len(self.SPECIALS)                 # category c -> class_offset + c
        self.loc_offset = self.class_offset + len(self.class_names)
        self.num_location_tokens = bins * bins if location == "grid" else 2 * bins
        self.vocab_size = self.loc_offset + self.num_location_tokens
        self.tokens_per_object = 4 if location == "grid" else 6  # [c, l_tl, l_br, d] or [c, x0, y0, x1, y1, d]
        self.seq_len = 2 + max_objects * self.tokens_per_object

    def quantise(self, v):
        return torch.round(torch.as_tensor(v, dtype=torch.float64).clamp(0, 1) * (self.bins - 1)).long()

    def location_xy(self):
        """(num_location_tokens, 2) bin centres (x, y) in [0, 1] for sin-cos initialisation; -1 = unused axis."""
        r = torch.arange(self.bins, dtype=torch.float32) / (self.bins - 1)
        if self.location == "grid":
            ys, xs = torch.meshgrid(r, r, indexing="ij")
            return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
        neg = -torch.ones(self.bins)
        return torch.cat([torch.stack([r, neg], 1), torch.stack([neg, r], 1)])

    def encode(self, boxes, labels, difficulty=None):
        """boxes (N, 4) xyxy in [0, 1], labels (N,), difficulty (N,) codes -> LongTensor (seq_len,)."""
        boxes, labels = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.as_tensor(labels).long()
        n = len(labels)
        if n > self.max_objects:
            raise ValueError(f"{n} objects exceed the token budget of {self.max_objects}")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"category index out of range 0..{len(self.class_names) - 1}")
        difficulty = torch.zeros(n, dtype=torch.long) if difficulty is None else torch.as_tensor(difficulty).long()
        q = self.quantise(boxes)  # (N, 4) bin indices of x0, y0, x1, y1
        if self.location == "grid":
            loc = torch.stack([q[:, 1] * self.bins + q[:, 0], q[:, 3] * self.bins + q[:, 2]], 1)
        else:
            loc = q + torch.tensor([0, self.bins, 0, self.bins])
        obj = torch.cat([(labels + self.class_offset)[:, None], loc + self.loc_offset,
                         (difficulty + self.diff_offset)[:, None]], 1)  # (N, T)
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        ids[0] = self.bos_id
        ids[1:1 + n * self.tokens_per_object] = obj.reshape(-1)
        ids[1 + n * self.tokens_per_object] = self.eos_id  # at most index seq_len - 1
        return ids

    def null_prompt(self):
        """The empty prompt that replaces 10% of layouts in training (classifier-free guidance)."""
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        ids[:3] = torch.tensor([self.bos_id, self.null_id, self.eos_id])
        return ids

    def object_slots(self, ids):
        """ids (B, L) -> slots (B, M, T) and valid (B, M): slot k holds object k's tokens (object_slots)."""
        return object_slots(ids, self)

    def decode(self, ids):
        """LongTensor (seq_len,) -> dict(boxes (m, 4) bin centres, labels (m,), difficulty (m,))."""
        slots, valid = object_slots(torch.as_tensor(ids).reshape(1, -1), self)
        obj = slots[0][valid[0]]  # (m, T)
        return dict(boxes=slot_boxes(obj, self), labels=obj[:, 0] - self.class_offset,
                    difficulty=obj[:, -1] - self.diff_offset)

    def render(self, ids):
        """'An image with circle <l3,5> <l12,14> [hard], ...' for logs and notebooks."""
        ids = torch.as_tensor(ids).reshape(-1)
        if len(ids) > 1 and ids[1] == self.null_id:
            return "<null>"
        d = self.decode(ids)
        q = (d["boxes"] * (self.bins - 1)).round().long().tolist()
        parts = []
        for (x0, y0, x1, y1), c, k in zip(q, d["labels"].tolist(), d["difficulty"].tolist()):
            loc = f"<l{x0},{y0}> <l{x1},{y1}>" if self.location == "grid" else f"<x{x0}> <y{y0}> <x{x1}> <y{y1}>"
            parts.append(f"{self.class_names[c]} {loc} [{DIFFICULTY[k]}]")
        return "An image with " + ", ".join(parts)


def tokenizer_from(meta):
    """The tokenizer a checkpoint was trained with, from the `tokenizer` dict it carries."""
    return LayoutTokenizer(meta["class_names"], bins=meta["bins"], max_objects=meta["max_objects"],
                           location=meta["location"])


# ----------------------------------------------------------------------------------------------
# 4. Data sets by name.

def resolve_data(name_or_path):
    """'shapes' (built on first use), 'coco_subset' (built by the coco-subset command) or a folder."""
    if name_or_path == "shapes":
        root = DATA_DIR / "shapes"
        if not root.exists():
            log.info("building the default data set in %s (once)", root)
            try:
                shapes.make_shapes(root)
            except coco.DataError:
                if not (root / "annotations" / "instances_val.json").exists():   # not a concurrent build: real
                    raise
        return root
    if name_or_path == "coco_subset":
        root = DATA_DIR / "coco_subset"
        if not root.exists():
            raise coco.DataError(f"{root}: missing. Build it from a local COCO 2017 copy with `python data.py "
                                 f"coco-subset --coco /path/to/coco` (annotations/instances_train2017.json, "
                                 f"train2017/, val2017/), or from any instances json with "
                                 f"`python data.py coco-subset --json FILE --images DIR`")
        return root
    root = Path(name_or_path)
    if not root.is_dir():
        raise coco.DataError(f"{root}: no such data folder (expected annotations/instances_{{train,val}}.json and "
                             f"images)")
    return root


# ----------------------------------------------------------------------------------------------
# The commands.

def main(argv=None):
    p = argparse.ArgumentParser(description="detdiff data: build the default `shapes` set, a COCO subset, "
                                            "or look at a data set.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shapes", help="generate the procedural `shapes` data set in COCO format (seconds)")
    s.add_argument("--out", default=str(DATA_DIR / "shapes"), help="folder to create (must not exist)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same data set")
    s.add_argument("--train", type=int, default=2000, help="training images")
    s.add_argument("--val", type=int, default=300, help="validation images")
    s.add_argument("--image-size", type=int, default=64, help="side of the written PNGs")
    c = sub.add_parser("coco-subset", help="build data/coco_subset from a local COCO copy or any instances json")
    c.add_argument("--coco", help="COCO 2017 root with annotations/instances_{train,val}2017.json, train2017/, val2017/")
    c.add_argument("--json", help="any instances json (then split deterministically by image id)")
    c.add_argument("--images", help="image folder for --json")
    c.add_argument("--out", default=str(DATA_DIR / "coco_subset"), help="folder to create (must not exist)")
    c.add_argument("--categories", default=",".join(coco_subset.DEFAULT_COCO_CATEGORIES), help="comma-separated names")
    c.add_argument("--size", type=int, default=128, help="side S the images are resized to")
    c.add_argument("--min-area", type=float, default=0.02, help="drop objects whose box is under this image fraction")
    c.add_argument("--max-objects", type=int, default=8, help="keep at most this many (largest) objects")
    c.add_argument("--max-images", type=int, default=None, help="at most this many images per split")
    v = sub.add_parser("show", help="draw 16 images with their boxes and print counts per category")
    v.add_argument("--data", default="shapes", help="shapes, coco_subset or a COCO-format folder")
    v.add_argument("--split", default="train")
    v.add_argument("--n", type=int, default=16, help="images in the grid")
    v.add_argument("--size", type=int, default=64, help="resolution S to load at")
    v.add_argument("--out", default="docs/shapes_grid.png", help="PNG to write (an existing file is an error)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "shapes":
            t0 = time.time()
            root = shapes.make_shapes(a.out, a.seed, a.train, a.val, a.image_size)
            print(f"wrote {root} in {time.time() - t0:.1f} s")
        elif a.cmd == "coco-subset":
            root = coco_subset.build_coco_subset(a.out, a.coco, a.json, a.images, a.categories.split(","), a.size,
                                                 a.min_area, a.max_objects, a.max_images)
            print(f"wrote {root}")
        else:
            out = Path(a.out)
            if out.exists():
                raise coco.DataError(f"{out}: already exists; choose another --out")
            ds = CocoLayoutDataset(resolve_data(a.data), a.split, size=a.size)
            counts = np.bincount(np.concatenate([ds.load(i)["labels"] for i in range(len(ds))]),
                                 minlength=len(ds.class_names))
            print(f"{a.data}/{a.split}: {len(ds)} images; objects per category: "
                  + ", ".join(f"{n} {k}" for n, k in zip(ds.class_names, counts)))
            tiles = [figures.draw_layout(from_model_range(it["image"]), it["boxes"], it["labels"], ds.class_names)
                     for it in (ds[i] for i in range(min(a.n, len(ds))))]
            out.parent.mkdir(parents=True, exist_ok=True)
            figures.image_grid(tiles).save(out)
            print(f"wrote {out}")
    except coco.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
