"""Data for detdiff: COCO-format layouts, the embedded `shapes` data set, and layout tokenization.

DetDiffusion (PAPER.md sections 1-2) conditions a diffusion model on a layout written as text,
"An image with {objects}", one object = (category c, location l, perception-aware attribute d).
This file owns everything between files on disk and that token sequence:

  1. images:   `to_model_range` / `from_model_range`, the one place pixels map to [-1, 1] and back
  2. masks:    COCO polygons and RLE (compressed and uncompressed) decoded here, no pycocotools needed
  3. reader:   `load_coco` + `CocoLayoutDataset` (resize to S x S, drop objects under 2% of the image,
               cap objects per image keeping the largest, shuffle object order) and `collate`
  4. tokens:   `LayoutTokenizer` (GeoDiffusion's location grid, category and [easy]/[hard] tokens)
  5. shapes:   `make_shapes`, a procedural COCO-format data set whose detection difficulty varies
  6. subsets:  `build_coco_subset`, a small COCO 2017 (or any instances json) subset resized to S

Commands (`python data.py --help`):
  python data.py shapes                         # writes data/shapes (a few seconds)
  python data.py show --data shapes             # docs/shapes_grid.png: 16 images with their boxes
  python data.py coco-subset --coco /path/coco  # writes data/coco_subset from a local COCO 2017 copy

A COCO-format folder is `ROOT/annotations/instances_{split}.json` plus images in `ROOT/{split}/`
(COCO 2017's own names, `instances_{split}2017.json` and `{split}2017/`, work too).
The loader only reads the user's folder; it never writes into it.
"""
import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger("detdiff.data")
DATA_DIR = Path(__file__).resolve().parent / "data"
DIFFICULTY = ("none", "easy", "hard")  # code 0 = no attribute yet, 1 = [easy], 2 = [hard]


class DataError(ValueError):
    """Bad input: the message is one line naming the file and the problem."""


# ----------------------------------------------------------------------------------------------
# 1. Pixel range: the only place images map to the model's [-1, 1] and back.

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


def open_rgb(path):
    """Any image COCO ships (RGB, grayscale, palette, RGBA, CMYK, 16-bit) -> RGB PIL image."""
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except Exception as e:  # PIL raises several types for undecodable files
        raise DataError(f"{path}: image will not decode ({type(e).__name__}: {e})") from None
    if im.mode in ("I;16", "I;16B", "I"):  # 16/32-bit grayscale: scale to 8 bit
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.uint8(255 * a / max(a.max(), 1)))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):  # alpha: composite onto mid-gray (a choice; COCO has none)
        bg = Image.new("RGBA", im.size, (127, 127, 127, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    return im.convert("RGB")  # L, P, CMYK, YCbCr -> RGB


# ----------------------------------------------------------------------------------------------
# 2. Instance masks. Convention (as pycocotools): pixel (x, y) covers [x, x+1) x [y, y+1) and belongs
# to a polygon when its centre (x + 0.5, y + 0.5) is inside (even-odd rule); RLE runs are column-major
# and start with a run of zeros.

def polygon_to_mask(polygons, h, w):
    """Union of COCO polygons [[x0, y0, x1, y1, ...], ...] (pixels) -> bool (h, w)."""
    mask = np.zeros((h, w), bool)
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = xs + 0.5, ys + 0.5
    for poly in polygons:
        p = np.asarray(poly, np.float64).reshape(-1, 2)
        inside = np.zeros((h, w), bool)
        for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
            if y0 == y1:
                continue
            crosses = (py >= min(y0, y1)) & (py < max(y0, y1))
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (px < x_at)
        mask |= inside
    return mask


def rle_string_to_counts(s):
    """Decode COCO's compressed RLE string (pycocotools rleFrString) into run lengths."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts):
    """Inverse of rle_string_to_counts (pycocotools rleToString)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            out.append(chr(48 + (c | 0x20 if more else c)))
    return "".join(out)


def rle_to_mask(rle):
    """{'size': [h, w], 'counts': list or str} -> bool (h, w)."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_string_to_counts(counts)
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}*{w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T  # column-major


def mask_to_rle(mask):
    """bool (h, w) -> compressed COCO RLE dict (used when coco_subset resizes RLE masks)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts_to_rle_string(counts)}


def resize_mask(mask, size):
    """bool (h, w) -> bool (S, S): area-average like the pixels' box filter, then threshold at 1/2."""
    m = Image.fromarray(np.uint8(mask) * 255).resize((size, size), Image.BOX)
    return np.asarray(m) >= 128


# ----------------------------------------------------------------------------------------------
# 3. The COCO reader.

def split_paths(root, split):
    """(instances json, image folder) of a split in a COCO-format folder, or a DataError saying what is missing."""
    root = Path(root)
    for name in (split, f"{split}2017"):
        js, images = root / "annotations" / f"instances_{name}.json", root / name
        if js.exists():
            return js, images
    raise DataError(f"{root}: no annotations/instances_{split}.json (or instances_{split}2017.json) found")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed json ({e})") from None


def load_coco(json_path, image_dir, check_files=True):
    """Read and check an instances json. Returns (class_names, category_ids, records, stats).

    One record per image: file, width, height, image_id and objects (box xyxy in pixels clipped to the
    image, category index, segmentation or None, annotation id). Crowd objects are left out of the layout,
    boxes past the border are clipped, zero-area boxes and degenerate polygons are dropped: each is counted.
    """
    coco = read_json(json_path)
    if not isinstance(coco, dict):
        raise DataError(f"{json_path}: expected a json object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{json_path}: missing or malformed '{key}' list")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in cats]
    cat_index = {cid: i for i, cid in enumerate(category_ids)}
    stats = dict(images=0, objects=0, crowd=0, clipped=0, zero_area=0, bad_polygons=0, empty_images=0)
    records = {}
    for im in coco["images"]:
        try:
            rec = dict(file=Path(image_dir) / im["file_name"], width=int(im["width"]),
                       height=int(im["height"]), image_id=int(im["id"]), objects=[])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{json_path}: image record {im!r:.80} lacks id, file_name, width or height") from None
        records[rec["image_id"]] = rec
    for a in coco["annotations"]:
        where = f"{json_path}: annotation {a.get('id')}"
        if a.get("image_id") not in records:
            raise DataError(f"{where} refers to unknown image_id {a.get('image_id')}")
        if a.get("category_id") not in cat_index:
            raise DataError(f"{where} has unknown category_id {a.get('category_id')}")
        if a.get("iscrowd", 0):
            stats["crowd"] += 1
            continue
        rec = records[a["image_id"]]
        x, y, w, h = (float(v) for v in a["bbox"])
        x0, y0 = min(max(x, 0), rec["width"]), min(max(y, 0), rec["height"])
        x1, y1 = min(max(x + w, 0), rec["width"]), min(max(y + h, 0), rec["height"])
        stats["clipped"] += (x0, y0, x1, y1) != (x, y, x + w, y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            stats["zero_area"] += 1
            continue
        seg = a.get("segmentation") or None
        if isinstance(seg, list):
            good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            stats["bad_polygons"] += len(seg) - len(good)  # fewer than 3 points: skipped
            seg = good or None
        rec["objects"].append(dict(box=(x0, y0, x1, y1), label=cat_index[a["category_id"]],
                                   segmentation=seg, ann_id=int(a["id"])))
        stats["objects"] += 1
    records = [records[k] for k in sorted(records)]
    stats["images"] = len(records)
    stats["empty_images"] = sum(not r["objects"] for r in records)
    if check_files:  # headers only: cheap, and catches missing files and wrong json sizes up front
        for rec in records:
            try:
                with Image.open(rec["file"]) as im:
                    size = im.size
            except FileNotFoundError:
                raise DataError(f"{rec['file']}: image file is missing (listed in {json_path})") from None
            except Exception as e:
                raise DataError(f"{rec['file']}: image will not decode ({type(e).__name__})") from None
            if size != (rec["width"], rec["height"]):
                raise DataError(f"{rec['file']}: json says {rec['width']}x{rec['height']}, "
                                f"the file is {size[0]}x{size[1]}")
    for k in ("crowd", "clipped", "zero_area", "bad_polygons", "empty_images"):
        if stats[k]:
            log.info("%s: %d %s", Path(json_path).name, stats[k], k.replace("_", " "))
    return [c["name"] for c in cats], category_ids, records, stats


class CocoLayoutDataset(torch.utils.data.Dataset):
    """Images resized to S x S with their layouts, the model's view of a COCO-format folder.

    Layout filtering as in PAPER.md section 1: objects whose box covers less than `min_area` of the image
    are dropped, and at most `max_objects` are kept (the largest). `attributes` maps annotation id to
    'easy' / 'hard' (the perception-aware attribute, kept in a sidecar file, never in the user's data).
    """

    def __init__(self, root, split="train", size=32, min_area=0.02, max_objects=8, attributes=None,
                 shuffle_objects=False, tokenizer=None, check_files=True):
        json_path, image_dir = split_paths(root, split)
        self.class_names, self.category_ids, self.records, self.stats = load_coco(json_path, image_dir, check_files)
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
        image = open_rgb(rec["file"])
        if image.size != (W, H):
            raise DataError(f"{rec['file']}: json says {W}x{H}, the file is {image.size[0]}x{image.size[1]}")
        image = np.asarray(image.resize((S, S), Image.BICUBIC, reducing_gap=None) if (W, H) != (S, S) else image)
        objs = [rec["objects"][k] for k in self.keep[i]]
        boxes = np.array([o["box"] for o in objs], np.float32).reshape(-1, 4) / np.array([W, H, W, H], np.float32)
        masks = np.zeros((len(objs), S, S), bool)
        for k, o in enumerate(objs):
            seg = o["segmentation"]
            if isinstance(seg, list):  # polygons: scale the vertices, rasterise at S (exact, cheap)
                masks[k] = polygon_to_mask([np.asarray(p) * np.tile([S / W, S / H], len(p) // 2) for p in seg], S, S)
            elif isinstance(seg, dict):  # RLE: decode at full size, area-resize like the pixels
                try:
                    m = rle_to_mask(seg)
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{rec['file']}: annotation {o['ann_id']} has a bad RLE ({e})") from None
                masks[k] = resize_mask(m, S)
            else:  # no segmentation: the filled box is the mask
                masks[k] = polygon_to_mask([[b * S for b in boxes[k][[0, 1, 2, 1, 2, 3, 0, 3]]]], S, S)
        item = dict(image=image, boxes=boxes, labels=np.array([o["label"] for o in objs], np.int64),
                    masks=masks, ann_ids=np.array([o["ann_id"] for o in objs], np.int64))
        self._cache[i] = item
        return item

    def __getitem__(self, i):
        it = self.load(i)
        n = len(it["labels"])
        order = torch.randperm(n) if self.shuffle_objects else torch.arange(n)  # PAPER.md s.1: shuffle objects
        diff = [DIFFICULTY.index(self.attributes.get(int(a), "none")) for a in it["ann_ids"]]
        out = dict(image=to_model_range(it["image"]),
                   boxes=torch.from_numpy(it["boxes"])[order].reshape(-1, 4),
                   labels=torch.from_numpy(it["labels"])[order],
                   difficulty=torch.tensor(diff, dtype=torch.long)[order].reshape(-1),
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
    from functools import partial
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
        collate_fn=partial(collate, max_objects=dataset.max_objects))


# ----------------------------------------------------------------------------------------------
# 4. Layout tokens: "An image with {objects}", an object = (c, l, d) (PAPER.md section 1).
# A point (x, y) in [0, 1] is quantised as GeoDiffusion does: index = round(y (n-1)) n + round(x (n-1)),
# so decoding x = ix / (n-1) is within half a bin, 1 / (2 (n-1)). location="axis" uses separate x and y
# tokens (2n of them) instead of n^2 grid tokens. Every object fills a fixed slot of T tokens, which lets
# the layout encoder pool one embedding per object.

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
        """ids (B, L) -> slots (B, M, T) and valid (B, M): slot k holds object k's tokens."""
        M, T = self.max_objects, self.tokens_per_object
        slots = ids[:, 1:1 + M * T].reshape(ids.shape[0], M, T)
        c = slots[..., 0]
        return slots, (c >= self.class_offset) & (c < self.loc_offset)

    def decode(self, ids):
        """LongTensor (seq_len,) -> dict(boxes (m, 4) bin centres, labels (m,), difficulty (m,))."""
        slots, valid = self.object_slots(torch.as_tensor(ids).reshape(1, -1))
        obj = slots[0][valid[0]]  # (m, T)
        loc = obj[:, 1:-1] - self.loc_offset
        if self.location == "grid":
            xy = torch.stack([loc % self.bins, loc // self.bins], -1).reshape(-1, 4)  # x0, y0, x1, y1
        else:
            xy = loc - torch.tensor([0, self.bins, 0, self.bins])
        return dict(boxes=xy.float() / (self.bins - 1), labels=obj[:, 0] - self.class_offset,
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


# ----------------------------------------------------------------------------------------------
# 5. The embedded default data set `shapes`: procedural, deterministic by seed, written once in COCO format.
# Five silhouettes on varied backgrounds; about 45% of the objects carry one nuisance (small, low contrast,
# occluded by an unlabelled bar, blurred, noisy) so that detection difficulty varies while every label stays
# right. Masks and boxes are the whole (amodal) silhouette, also where a bar hides part of it. The nuisance
# is kept in each annotation ("nuisance") so that later stages can check what [hard] objects are.

SHAPES = ("circle", "square", "triangle", "cross", "star")
NUISANCES = ("small", "low_contrast", "occlusion", "blur", "noise")


def shape_polygon(name, rng):
    """Unit-radius outline (K, 2) of a silhouette, randomly rotated (circles need no rotation)."""
    if name == "circle":
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "square":
        p = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8
    elif name == "triangle":
        a = np.deg2rad([90, 210, 330])
        p = np.stack([np.cos(a), np.sin(a)], 1)
    elif name == "cross":
        u, v = 1.0, 0.33
        p = np.array([[-v, -u], [v, -u], [v, -v], [u, -v], [u, v], [v, v], [v, u], [-v, u], [-v, v], [-u, v],
                      [-u, -v], [-v, -v]])
    elif name == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        p = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    else:
        raise ValueError(name)
    t = rng.uniform(0, 2 * np.pi)
    return p @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def _background(rng, S):
    kind = rng.integers(3)
    if kind == 0:  # solid
        bg = np.ones((S, S, 3)) * rng.uniform(0, 255, 3)
    elif kind == 1:  # linear gradient in a random direction
        t = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:S, 0:S] / (S - 1)
        w = ((xs - 0.5) * np.cos(t) + (ys - 0.5) * np.sin(t) + 0.71) / 1.42
        bg = (1 - w)[..., None] * rng.uniform(0, 255, 3) + w[..., None] * rng.uniform(0, 255, 3)
    else:  # smooth texture: a 4x4 colour field upsampled
        small = Image.fromarray(np.uint8(rng.uniform(0, 255, (4, 4, 3))))
        bg = np.asarray(small.resize((S, S), Image.BICUBIC), np.float64)
    return bg


def _luma(c):
    return float(np.dot(c, [0.299, 0.587, 0.114]))


def render_shapes_image(rng, S=64, max_objects=5, nuisance_p=0.45, ss=4):
    """One image (uint8 (S, S, 3)) and its objects: category, polygon (pixels), nuisance."""
    img = _background(rng, S)
    objects, boxes = [], []
    for _ in range(rng.integers(1, max_objects + 1)):
        cls = SHAPES[rng.integers(len(SHAPES))]
        nuisance = NUISANCES[rng.integers(len(NUISANCES))] if rng.random() < nuisance_p else "none"
        unit = shape_polygon(cls, rng)
        r = rng.uniform(5.5, 7.0) if nuisance == "small" else rng.uniform(7.5, 15.0)
        span = unit.max(0) - unit.min(0)
        while np.prod(span * r) < 0.022 * S * S:  # keep every object above the 2% filter
            r *= 1.1
        for _try in range(50):  # place so that at most 10% of the smaller box overlaps an earlier one
            lo = -unit.min(0) * r + 1
            hi = S - 1 - unit.max(0) * r
            poly = unit * r + rng.uniform(lo, np.maximum(lo, hi))
            box = np.concatenate([poly.min(0), poly.max(0)])
            if all(_overlap(box, b) < 0.1 for b in boxes):
                break
        else:
            continue
        x0, y0, x1, y1 = (int(v) for v in (box[0], box[1], math.ceil(box[2]), math.ceil(box[3])))
        bg_l = _luma(img[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        if nuisance == "low_contrast":  # a colour a few grey levels off the local background
            colour = img[y0:y1, x0:x1].reshape(-1, 3).mean(0) + rng.choice([-1, 1]) * rng.uniform(14, 24)
        else:
            for _c in range(100):
                colour = rng.uniform(0, 255, 3)
                if abs(_luma(colour) - bg_l) > 70:
                    break
        # supersampled coverage of the box's pixels = antialiased edges
        cx0, cy0, cx1, cy1 = max(0, x0 - 1), max(0, y0 - 1), min(S, x1 + 1), min(S, y1 + 1)
        alpha = Image.new("L", ((cx1 - cx0) * ss, (cy1 - cy0) * ss))
        ImageDraw.Draw(alpha).polygon([tuple(p) for p in (poly - [cx0, cy0]) * ss - 0.5], fill=255)
        a = np.asarray(alpha.resize((cx1 - cx0, cy1 - cy0), Image.BOX), np.float64)[..., None] / 255
        img[cy0:cy1, cx0:cx1] = img[cy0:cy1, cx0:cx1] * (1 - a) + np.clip(colour, 0, 255) * a
        if nuisance == "occlusion":  # an unlabelled bar over 35-50% of the object
            horizontal = rng.random() < 0.5
            lo_, hi_ = (y0, y1) if horizontal else (x0, x1)
            th = max(2, int(round(rng.uniform(0.35, 0.5) * (hi_ - lo_))))
            start = int(rng.integers(lo_, max(lo_ + 1, hi_ - th + 1)))
            bar = (slice(start, start + th), slice(max(0, x0 - 2), x1 + 2)) if horizontal else \
                  (slice(max(0, y0 - 2), y1 + 2), slice(start, start + th))
            img[bar] = rng.uniform(0, 255, 3)
        elif nuisance in ("blur", "noise"):
            m = 3
            ya, yb, xa, xb = max(0, y0 - m), min(S, y1 + m), max(0, x0 - m), min(S, x1 + m)
            patch = img[ya:yb, xa:xb]
            if nuisance == "blur":
                pim = Image.fromarray(np.uint8(np.clip(patch, 0, 255)))
                patch = np.asarray(pim.filter(ImageFilter.GaussianBlur(rng.uniform(1.3, 2.0))), np.float64)
            else:
                patch = patch + rng.normal(0, rng.uniform(30, 50), patch.shape)
            img[ya:yb, xa:xb] = patch
        boxes.append(box)
        objects.append(dict(category=cls, polygon=poly, nuisance=nuisance))
    img = img + rng.normal(0, 3, img.shape)  # mild sensor noise everywhere
    return np.uint8(np.clip(np.round(img), 0, 255)), objects


def _overlap(a, b):
    """Intersection over the smaller box's area (catches a small box inside a big one, which IoU misses)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def private_tmp(out):
    """A new temporary folder beside `out`, private to this process: two processes building the same data set at
    once (two notebooks, a test run beside the main job) never write into each other's files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(tmp, out):
    """Rename a finished `tmp` to `out`: all or nothing, an interrupted build leaves no half data set behind. If
    another process published `out` first, ours is discarded and a DataError says so."""
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            raise DataError(f"{out}: was written by another process while this one was building it") from None
        raise
    return out


def make_shapes(out=DATA_DIR / "shapes", seed=0, n_train=2000, n_val=300, image_size=64, progress=True):
    """Write the `shapes` data set in COCO format (PNG images, instances json with polygons) to `out`."""
    from tqdm import tqdm
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    tmp = private_tmp(out)
    categories = [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(SHAPES)]
    ann_id = 1
    for code, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        (tmp / split).mkdir(parents=True)
        images, anns = [], []
        for i in tqdm(range(n), desc=f"shapes/{split}", disable=not progress, leave=False):
            image_id = code * 1_000_000 + i + 1
            rng = np.random.default_rng([seed, code, i])  # per-image stream: order-independent, reproducible
            img, objects = render_shapes_image(rng, image_size)
            name = f"{image_id:07d}.png"
            Image.fromarray(img).save(tmp / split / name)
            images.append(dict(id=image_id, file_name=name, width=image_size, height=image_size))
            for o in objects:
                p = np.round(o["polygon"], 2)
                x0, y0 = p.min(0)
                x1, y1 = p.max(0)
                area = 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
                anns.append(dict(id=ann_id, image_id=image_id, category_id=SHAPES.index(o["category"]) + 1,
                                 bbox=[round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                 area=round(float(area), 2), segmentation=[p.reshape(-1).tolist()],
                                 iscrowd=0, nuisance=o["nuisance"]))
                ann_id += 1
        (tmp / "annotations").mkdir(exist_ok=True)
        with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dict(images=images, annotations=anns, categories=categories,
                           info=dict(description="detdiff shapes", seed=seed, image_size=image_size)), f)
    return publish(tmp, out)


def resolve_data(name_or_path):
    """'shapes' (built on first use), 'coco_subset' (built by the coco-subset command) or a folder."""
    if name_or_path == "shapes":
        root = DATA_DIR / "shapes"
        if not root.exists():
            log.info("building the default data set in %s (once)", root)
            try:
                make_shapes(root)
            except DataError:
                if not (root / "annotations" / "instances_val.json").exists():   # not a concurrent build: real
                    raise
        return root
    if name_or_path == "coco_subset":
        root = DATA_DIR / "coco_subset"
        if not root.exists():
            raise DataError(f"{root}: missing. Build it from a local COCO 2017 copy with "
                            f"`python data.py coco-subset --coco /path/to/coco` (annotations/instances_train2017.json, "
                            f"train2017/, val2017/), or from any instances json with "
                            f"`python data.py coco-subset --json FILE --images DIR`")
        return root
    root = Path(name_or_path)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder (expected annotations/instances_{{train,val}}.json and images)")
    return root


# ----------------------------------------------------------------------------------------------
# 6. coco_subset: a few categories of COCO 2017 (or of any instances json), filtered and resized to S.

DEFAULT_COCO_CATEGORIES = ("person", "car", "bus", "dog", "cat", "horse")


def build_coco_subset(out=DATA_DIR / "coco_subset", coco=None, json_path=None, images=None,
                      categories=DEFAULT_COCO_CATEGORIES, size=128, min_area=0.02, max_objects=8,
                      max_images=None, val_every=10):
    """Write a small COCO-format subset. From a COCO 2017 folder (`coco`) its train/val splits are kept;
    from a single `json_path` + `images` folder, images go to val when crc32(image id) % val_every == 0.
    Images are stretched to size x size; boxes, polygons and RLE masks are transformed with them."""
    import zlib
    from tqdm import tqdm
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; remove it or choose another --out")
    if coco is not None:
        sources = {s: (Path(coco) / "annotations" / f"instances_{s}2017.json", Path(coco) / f"{s}2017", None)
                   for s in ("train", "val")}
    elif json_path is not None and images is not None:
        sources = {s: (Path(json_path), Path(images), s) for s in ("train", "val")}
    else:
        raise DataError("coco-subset needs --coco DIR, or --json FILE and --images DIR")
    tmp = private_tmp(out)
    loaded = {}
    for split, (js, image_dir, pick) in sources.items():
        if js not in loaded:
            loaded[js] = load_coco(js, image_dir, check_files=False)
        names, cat_ids, records, _ = loaded[js]
        missing = [c for c in categories if c not in names]
        if missing:
            raise DataError(f"{js}: no categories named {missing}; it has {names[:10]}...")
        chosen = {names.index(c) for c in categories}
        (tmp / split).mkdir(parents=True)
        out_images, out_anns, n_dropped = [], [], 0
        for rec in tqdm(records, desc=f"coco_subset/{split}", leave=False):
            if pick is not None and (zlib.crc32(str(rec["image_id"]).encode()) % val_every == 0) != (pick == "val"):
                continue
            W, H = rec["width"], rec["height"]
            objs = [o for o in rec["objects"] if o["label"] in chosen]
            area = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) / (W * H) for o in objs]
            keep = [objs[i] for i in np.argsort(area, kind="stable")[::-1] if area[i] >= min_area][:max_objects]
            n_dropped += len(objs) - len(keep)
            if not keep:
                continue
            image = open_rgb(rec["file"])
            if image.size != (W, H):
                raise DataError(f"{rec['file']}: json says {W}x{H}, the file is {image.size[0]}x{image.size[1]}")
            name = f"{rec['image_id']:012d}.png"
            image.resize((size, size), Image.BICUBIC).save(tmp / split / name)
            out_images.append(dict(id=rec["image_id"], file_name=name, width=size, height=size))
            sx, sy = size / W, size / H
            for o in keep:
                x0, y0, x1, y1 = o["box"]
                ann = dict(id=o["ann_id"], image_id=rec["image_id"], category_id=cat_ids[o["label"]], iscrowd=0,
                           bbox=[x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy])
                seg = o["segmentation"]
                if isinstance(seg, list):
                    ann["segmentation"] = [(np.asarray(p) * np.tile([sx, sy], len(p) // 2)).round(2).tolist()
                                           for p in seg]
                elif isinstance(seg, dict):
                    ann["segmentation"] = mask_to_rle(resize_mask(rle_to_mask(seg), size))
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
                out_anns.append(ann)
            if max_images and len(out_images) >= max_images:
                break
        log.info("coco_subset/%s: %d images, %d objects, %d dropped by the area filter or the cap",
                 split, len(out_images), len(out_anns), n_dropped)
        cats = [dict(id=cat_ids[i], name=names[i]) for i in sorted(chosen)]
        (tmp / "annotations").mkdir(exist_ok=True)
        with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dict(images=out_images, annotations=out_anns, categories=cats), f)
    return publish(tmp, out)


# ----------------------------------------------------------------------------------------------
# 7. Pictures: a layout drawn on its image, and grids of them.

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
DIFFICULTY_COLOURS = {1: (0, 220, 0), 2: (255, 0, 0)}  # [easy] green, [hard] red


def draw_layout(image, boxes, labels, class_names, difficulty=None, scale=4):
    """uint8 (H, W, 3) image + boxes in [0, 1] -> PIL image enlarged `scale` times with boxes and names.
    Colour is per class, or green/red for [easy]/[hard] when difficulty is given."""
    im = Image.fromarray(np.asarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    W, H = im.size
    for k, (box, c) in enumerate(zip(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1))):
        code = int(difficulty[k]) if difficulty is not None else 0
        colour = DIFFICULTY_COLOURS.get(code, PALETTE[int(c) % len(PALETTE)])
        x0, y0, x1, y1 = box * [W, H, W, H]
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=1)
        d.text((x0 + 2, y0 + 1), class_names[int(c)][:6], fill=colour)
    return im


def image_grid(images, ncol=4, pad=2, fill=(255, 255, 255)):
    """List of equally sized PIL images -> one grid image."""
    w, h = images[0].size
    nrow = math.ceil(len(images) / ncol)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), fill)
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)))
    return grid


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
    c.add_argument("--categories", default=",".join(DEFAULT_COCO_CATEGORIES), help="comma-separated names")
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
            import time
            t0 = time.time()
            root = make_shapes(a.out, a.seed, a.train, a.val, a.image_size)
            print(f"wrote {root} in {time.time() - t0:.1f} s")
        elif a.cmd == "coco-subset":
            root = build_coco_subset(a.out, a.coco, a.json, a.images, a.categories.split(","), a.size,
                                     a.min_area, a.max_objects, a.max_images)
            print(f"wrote {root}")
        else:
            out = Path(a.out)
            if out.exists():
                raise DataError(f"{out}: already exists; choose another --out")
            ds = CocoLayoutDataset(resolve_data(a.data), a.split, size=a.size)
            counts = np.bincount(np.concatenate([ds.load(i)["labels"] for i in range(len(ds))]),
                                 minlength=len(ds.class_names))
            print(f"{a.data}/{a.split}: {len(ds)} images; objects per category: "
                  + ", ".join(f"{n} {k}" for n, k in zip(ds.class_names, counts)))
            tiles = [draw_layout(from_model_range(it["image"]), it["boxes"], it["labels"], ds.class_names)
                     for it in (ds[i] for i in range(min(a.n, len(ds))))]
            out.parent.mkdir(parents=True, exist_ok=True)
            image_grid(tiles).save(out)
            print(f"wrote {out}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
