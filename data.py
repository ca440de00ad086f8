"""Data for detdiff: a COCO-format folder read into the model's view, the layout tokens, and
training batches.

DetDiffusion (docs/paper.md sections 1-2) conditions a diffusion model on a layout written as text,
"An image with {objects}", one object = (category c, location l, perception-aware attribute d).
This file owns everything between a data set on disk and that token sequence, in one data path:

  1. pixels:   `to_model_range` / `from_model_range`, the one place pixels map to [-1, 1] and back, and
               `box_pixels`, the one rule for which pixels lie in a box
  2. on disk:  `load_coco` (check an instances json, one record per image), its images (`open_rgb`) and
               instance masks (`polygon_to_mask`, `rle_to_mask`); no pycocotools needed
  3. reader:   `CocoLayoutDataset` (resize to S x S, drop objects under 2% of the image, cap objects per image
               keeping the largest, shuffle object order) and `collate`
  4. tokens:   `LayoutTokenizer` (GeoDiffusion's location grid, category and [easy]/[hard] tokens)
  5. batches:  `DecodedLayouts`, a split decoded once into tensors, each training batch built by indexing
  6. names:    `resolve_data`: `shapes`, `coco_subset` or a folder
  7. pictures: `draw_layout`, `image_grid` (a layout drawn on its image; the training loop's sample grids)

A COCO-format folder is `ROOT/annotations/instances_{split}.json` plus images in `ROOT/{split}/`
(COCO 2017's own names, `instances_{split}2017.json` and `{split}2017/`, work too). The reader only
reads the user's folder; it never writes into it. The data sets themselves are made in data_sets/
(`python -m data_sets --help`).

    notebooks/02_layout_tokens.ipynb              # one image, its layout, its prompt and token ids
    python -m data_sets show --data shapes        # 16 images of a data set with their boxes
"""
import logging
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from config import DataError, read_json

log = logging.getLogger("detdiff.data")
DATA_DIR = Path(__file__).resolve().parent / "data"
DIFFICULTY = ("none", "easy", "hard")  # code 0 = no attribute yet, 1 = [easy], 2 = [hard]


def difficulty_codes(attributes, ann_ids):
    """The attribute code of each annotation id (DIFFICULTY's index): [none] where the sidecar has
    no label."""
    return [DIFFICULTY.index(attributes.get(int(a), "none")) for a in ann_ids]


# ---------------------------------------------------------------------------------------------- 1.
# Pixels: the only place images map to the model's [-1, 1] and back, and the one pixel-in-box rule.

def to_model_range(image):
    """uint8 (H, W, 3) array or PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"to_model_range wants uint8 (H, W, 3), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def from_model_range(x):
    """float tensor (3, H, W) in [-1, 1] -> uint8 (H, W, 3) numpy array (values outside are
    clipped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"from_model_range wants (3, H, W), got {tuple(x.shape)}")
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(1, 2, 0).numpy()


def box_spans(boxes, S, grow=0):
    """The one pixel-in-box rule of the project: on an S x S grid, pixel (i, j) belongs to a box
    when its centre ((j + 0.5) / S, (i + 0.5) / S) lies in [x0, x1) x [y0, y1): the left and top
    edges in, the right and bottom edges out, so boxes that share an edge share no pixel. boxes
    (..., 4) xyxy in [0, 1]; grow: pixels added on every side. -> centres (S,), in_x (..., S), in_y
    (..., S) (the box's columns and rows)."""
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    c = (torch.arange(S, device=boxes.device, dtype=dt) + 0.5) / S
    x0, y0, x1, y1 = (boxes[..., i, None].to(dt) for i in range(4))      # (..., 1)
    g = grow / S
    return c, (c >= x0 - g) & (c < x1 + g), (c >= y0 - g) & (c < y1 + g)


def flip_boxes(boxes):
    """Boxes (..., 4) xyxy in [0, 1] of an image mirrored left-right: (1 - x1, y0, 1 - x0, y1)."""
    return torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)


def box_pixels(boxes, S, grow=0):
    """bool (..., S, S): the pixels of each box under box_spans' rule. boxes (..., 4) xyxy in [0,
    1]."""
    _, in_x, in_y = box_spans(torch.as_tensor(boxes), S, grow)
    return in_y[..., :, None] & in_x[..., None, :]


# ---------------------------------------------------------------------------------------------- 2.
# A COCO-format folder on disk. Masks as pycocotools: pixel (x, y) covers [x, x+1) x [y, y+1) and
# belongs to a polygon when its centre (x + 0.5, y + 0.5) is inside (even-odd rule); RLE runs are
# column-major and start with a run of zeros. Writing them (data sets, generated data) is
# data_sets/coco.py's.

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


def resize_mask(mask, size):
    """bool (h, w) -> bool (S, S): area-average like the pixels' box filter, then threshold at
    1/2."""
    m = Image.fromarray(np.uint8(mask) * 255).resize((size, size), Image.BOX)
    return np.asarray(m) >= 128


def split_paths(root, split):
    """(instances json, image folder) of a split in a COCO-format folder, or a DataError saying what
    is missing."""
    root = Path(root)
    for name in (split, f"{split}2017"):
        js, images = root / "annotations" / f"instances_{name}.json", root / name
        if js.exists():
            return js, images
    raise DataError(f"{root}: no annotations/instances_{split}.json (or "
                    f"instances_{split}2017.json) found")


def load_coco(json_path, image_dir, check_files=True):
    """Read and check an instances json. Returns (class_names, category_ids, records, stats).

    One record per image: file, width, height, image_id and objects (box xyxy in pixels clipped to
    the image, category index, segmentation or None, annotation id). Crowd objects are left out of
    the layout, boxes past the border are clipped, zero-area boxes and degenerate polygons are
    dropped: each is counted. """
    coco = read_json(json_path)
    if not isinstance(coco, dict):
        raise DataError(f"{json_path}: expected a json object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{json_path}: missing or malformed '{key}' list")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in cats]
    cat_index = {cid: i for i, cid in enumerate(category_ids)}
    stats = dict(images=0, objects=0, crowd=0, clipped=0, zero_area=0, bad_polygons=0,
                 empty_images=0)
    records = {}
    for im in coco["images"]:
        try:
            rec = dict(file=Path(image_dir) / im["file_name"], width=int(im["width"]),
                       height=int(im["height"]), image_id=int(im["id"]), objects=[])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{json_path}: image record {im!r:.80} lacks id, file_name, width or "
                            f"height") from None
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


# ----------------------------------------------------------------------------------------------
# 3. The reader: a COCO-format split as images at S x S with their layouts.


class CocoLayoutDataset(torch.utils.data.Dataset):
    """Images resized to S x S with their layouts, the model's view of a COCO-format folder.

    Layout filtering as in docs/paper.md section 1: objects whose box covers less than `min_area` of
    the image are dropped, and at most `max_objects` are kept (the largest). `attributes` maps
    annotation id to 'easy' / 'hard' (the perception-aware attribute, kept in a sidecar file, never
    in the user's data). """

    def __init__(self, root, split="train", size=32, min_area=0.02, max_objects=8, attributes=None,
                 shuffle_objects=False, tokenizer=None, check_files=True):
        json_path, image_dir = split_paths(root, split)
        self.class_names, self.category_ids, self.records, self.stats = load_coco(
            json_path, image_dir, check_files
        )
        if tokenizer is not None and tokenizer.max_objects < max_objects:
            raise ValueError(f"tokenizer holds {tokenizer.max_objects} objects, dataset keeps "
                             f"{max_objects}")
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
        log.info("%s/%s: %d images, %d objects kept, %d under %.0f%% area dropped, %d over the cap "
                 "of %d dropped",
                 Path(root).name, split, len(self.records), sum(map(len, self.keep)),
                 self.stats["dropped_small"], 100 * min_area, self.stats["dropped_cap"],
                 max_objects)
        self._cache = {}

    def keep_only(self, positions):
        """Keep the images at `positions` (of this split's order), in place: the loaders index no
        other image afterwards (train.py's --train-subset)."""
        self.records = [self.records[i] for i in positions]
        self.keep = [self.keep[i] for i in positions]
        self._cache = {}

    def __len__(self):
        return len(self.records)

    def load(self, i):
        """Image i resized to S x S: uint8 image (S, S, 3), boxes (N, 4) in [0, 1], labels, masks
        (N, S, S)."""
        if i in self._cache:
            return self._cache[i]
        rec, S = self.records[i], self.size
        W, H = rec["width"], rec["height"]
        image = open_rgb(rec["file"])
        if image.size != (W, H):
            raise DataError(f"{rec['file']}: json says {W}x{H}, the file is "
                            f"{image.size[0]}x{image.size[1]}")
        image = np.asarray(
            image.resize((S, S), Image.BICUBIC, reducing_gap=None) if (W, H) != (S, S) else image
        )
        objs = [rec["objects"][k] for k in self.keep[i]]
        boxes = np.array([o["box"] for o in objs], np.float32).reshape(-1, 4) / np.array([W, H, W, H], np.float32)
        masks = np.zeros((len(objs), S, S), bool)
        for k, o in enumerate(objs):
            seg = o["segmentation"]
            if isinstance(seg, list):  # polygons: scale the vertices, rasterise at S (exact, cheap)
                scaled = [np.asarray(p) * np.tile([S / W, S / H], len(p) // 2) for p in seg]
                masks[k] = polygon_to_mask(scaled, S, S)
            elif isinstance(seg, dict):  # RLE: decode at full size, area-resize like the pixels
                try:
                    m = rle_to_mask(seg)
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{rec['file']}: annotation {o['ann_id']} has a bad RLE ({e})") from None
                masks[k] = resize_mask(m, S)
            else:  # no segmentation: the filled box is the mask
                masks[k] = polygon_to_mask([[b * S for b in boxes[k][[0, 1, 2, 1, 2, 3, 0, 3]]]], S,
                                           S)
        item = dict(image=image, boxes=boxes, labels=np.array([o["label"] for o in objs], np.int64),
                    masks=masks, ann_ids=np.array([o["ann_id"] for o in objs], np.int64))
        self._cache[i] = item
        return item

    def __getitem__(self, i):
        it = self.load(i)
        n = len(it["labels"])
        # docs/paper.md section 1: shuffle objects
        order = torch.randperm(n) if self.shuffle_objects else torch.arange(n)
        difficulty = difficulty_codes(self.attributes, it["ann_ids"])
        out = dict(image=to_model_range(it["image"]),
                   boxes=torch.from_numpy(it["boxes"])[order].reshape(-1, 4),
                   labels=torch.from_numpy(it["labels"])[order],
                   difficulty=torch.tensor(difficulty, dtype=torch.long)[order].reshape(-1),
                   masks=torch.from_numpy(it["masks"]).float()[order].reshape(-1, self.size, self.size),
                   ann_ids=torch.from_numpy(it["ann_ids"])[order],
                   image_id=self.records[i]["image_id"])
        if self.tokenizer is not None:
            out["tokens"] = self.tokenizer.encode(out["boxes"], out["labels"], out["difficulty"])
        return out


def collate(items, max_objects=None):
    """Pad the objects of a batch to M = max_objects (default: the largest count in the batch)."""
    B = len(items)
    M = max_objects or max(1, max(len(it["labels"]) for it in items))
    S = items[0]["image"].shape[-1]
    out = dict(image=torch.stack([it["image"] for it in items]), boxes=torch.zeros(B, M, 4),
               labels=torch.zeros(B, M, dtype=torch.long),
               difficulty=torch.zeros(B, M, dtype=torch.long),
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


# ---------------------------------------------------------------------------------------------- 4.
# Layout tokens: "An image with {objects}", an object = (c, l, d) (docs/paper.md section 1). A point
# (x, y) in [0, 1] is quantised as GeoDiffusion does: index = round(y (n-1)) n + round(x (n-1)), so
# decoding x = ix / (n-1) is within half a bin, 1 / (2 (n-1)). Every object fills a fixed slot of T
# = 4 tokens [c, l_top_left, l_bottom_right, d], which lets the layout encoder pool one embedding
# per object.

def object_slots(ids, layout):
    """ids (B, L) -> slots (B, M, T) and valid (B, M): slot k holds object k's T tokens, and it is a
    real object when its first token is a category. `layout` is anything that carries the token
    layout (a LayoutTokenizer or the UNet's config): max_objects, tokens_per_object, class_offset,
    loc_offset."""
    M, T = layout.max_objects, layout.tokens_per_object
    slots = ids[:, 1:1 + M * T].reshape(ids.shape[0], M, T)
    c = slots[..., 0]
    return slots, (c >= layout.class_offset) & (c < layout.loc_offset)


def slot_boxes(slots, layout):
    """slots (..., T) -> boxes (..., 4) xyxy in [0, 1]: the location tokens read back to their bin
    centres, the inverse of LayoutTokenizer.encode (within half a bin). A slot with no object gives
    a junk box; mask it with object_slots' valid. `layout` also carries bins."""
    n = layout.bins
    loc = (slots[..., 1:3] - layout.loc_offset).clamp(min=0)       # (..., 2) grid indices y n + x
    q = torch.stack([loc % n, loc // n], -1).flatten(-2)           # (..., 4) x0, y0, x1, y1
    return q.float() / (n - 1)


class LayoutTokenizer:
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<null>", "[none]", "[easy]", "[hard]")
    tokens_per_object = 4                                      # [c, l_tl, l_br, d]

    def __init__(self, class_names, bins=32, max_objects=8):
        if bins < 2:
            raise ValueError("bins must be at least 2")
        self.class_names, self.bins, self.max_objects = list(class_names), bins, max_objects
        self.pad_id, self.bos_id, self.eos_id, self.null_id = 0, 1, 2, 3
        self.diff_offset = 4                                   # [none], [easy], [hard] = 4, 5, 6
        self.class_offset = len(self.SPECIALS)                 # category c -> class_offset + c
        self.loc_offset = self.class_offset + len(self.class_names)
        self.num_location_tokens = bins * bins
        self.vocab_size = self.loc_offset + self.num_location_tokens
        self.seq_len = 2 + max_objects * self.tokens_per_object

    def quantise(self, v):
        return torch.round(
            torch.as_tensor(v, dtype=torch.float64).clamp(0, 1) * (self.bins - 1)
        ).long()

    def location_xy(self):
        """(num_location_tokens, 2) bin centres (x, y) in [0, 1], for the sin-cos initialisation."""
        r = torch.arange(self.bins, dtype=torch.float32) / (self.bins - 1)
        ys, xs = torch.meshgrid(r, r, indexing="ij")
        return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)

    def object_tokens(self, boxes, labels, difficulty):
        """Each object's slot: boxes (..., 4) xyxy in [0, 1], labels (...), difficulty (...) codes
        -> (..., T)."""
        q = self.quantise(boxes).to(labels.device)          # (..., 4) bin indices of x0, y0, x1, y1
        loc = torch.stack([q[..., 1] * self.bins + q[..., 0], q[..., 3] * self.bins + q[..., 2]],
                          -1)
        return torch.cat([(labels + self.class_offset)[..., None], loc + self.loc_offset,
                          (difficulty + self.diff_offset)[..., None]], -1)

    def encode(self, boxes, labels, difficulty=None):
        """boxes (N, 4) xyxy in [0, 1], labels (N,), difficulty (N,) codes -> LongTensor
        (seq_len,)."""
        boxes, labels = (
            torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.as_tensor(labels).long(),
        )
        n = len(labels)
        if n > self.max_objects:
            raise ValueError(f"{n} objects exceed the token budget of {self.max_objects}")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"category index out of range 0..{len(self.class_names) - 1}")
        difficulty = (
            torch.zeros(n, dtype=torch.long)
            if difficulty is None
            else torch.as_tensor(difficulty).long()
        )
        slots = self.object_tokens(boxes, labels, difficulty)  # (N, T)
        return self.sequence(slots[None], torch.ones(1, n, dtype=torch.bool))[0]

    def sequence(self, slots, valid):
        """Layout tokens (B, L) from the objects' slots (B, N, T), N <= max_objects, valid (B, N)
        (the real objects first): <bos>, the slots (padding slots hold <pad>), <eos> right after the
        last object, <pad> to the end."""
        B, N, T = slots.shape
        ids = torch.full((B, self.seq_len), self.pad_id, dtype=torch.long, device=slots.device)
        ids[:, 0] = self.bos_id
        ids[:, 1:1 + N * T] = torch.where(valid[..., None], slots, self.pad_id).flatten(1)
        end = 1 + valid.sum(1, keepdim=True) * T                                        # (B, 1)
        return ids.scatter(1, end, self.eos_id)

    def null_prompt(self):
        """The empty prompt that replaces 10% of layouts in training (classifier-free guidance)."""
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        ids[:3] = torch.tensor([self.bos_id, self.null_id, self.eos_id])
        return ids

    def object_slots(self, ids):
        """ids (B, L) -> slots (B, M, T) and valid (B, M): slot k holds object k's tokens
        (object_slots)."""
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
        parts = [f"{self.class_names[c]} <l{x0},{y0}> <l{x1},{y1}> [{DIFFICULTY[k]}]"
                 for (x0, y0, x1, y1), c,
                 k in zip(q, d["labels"].tolist(), d["difficulty"].tolist())]
        return "An image with " + ", ".join(parts)


def tokenizer_from(meta):
    """The tokenizer a checkpoint was trained with, from the `tokenizer` dict it carries."""
    return LayoutTokenizer(meta["class_names"], bins=meta["bins"], max_objects=meta["max_objects"])


# ---------------------------------------------------------------------------------------------- 5.
# Training batches. The reader gives one item at a time (decode, tokenise, then `collate`):
# readable, and what the detector, the notebooks and the tests use. A training step on a GPU takes a
# few milliseconds, and building its 32 items one by one in Python took longer than that, so the
# training loop (train.py) reads its batches from `DecodedLayouts`: every image, box, label,
# attribute and mask of a split decoded once, every object tokenised once, the tensors kept on the
# training device when they fit; a batch is then a handful of indexing operations. It is the batch
# `collate([dataset[i] for i in idx])` gives for the same draw of object orders, and the draw is the
# item path's: one `torch.randperm(n)` per image on the CPU's global generator (the object shuffle).
# Size kept (uint8 images, bool masks, M = max objects): N (3 + M) S^2 bytes: shapes at 32 px, 22
# MB; a 10k-image COCO subset at 128 px, 1.8 GB. In latent mode the images are not kept (the loop
# keeps the latents).

DEVICE_SHARE = 0.25   # keep the tensors on a CUDA device when they take at most this share of its
                      # free memory


def storage_device(nbytes, device):
    """Where the decoded tensors live: on the training device when they fit (a CUDA device: at most
    DEVICE_SHARE of its free memory; the CPU and Apple's MPS, whose memory is the host's: always),
    else on the host, pinned so that each batch copies to the device without blocking."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return device if nbytes <= DEVICE_SHARE * free else torch.device("cpu")
    return device


class DecodedLayouts:
    """A CocoLayoutDataset split (with its tokenizer and attributes) decoded once into tensors:
    images (N, 3, S, S) uint8 (unless images=False), boxes (N, M, 4), labels, difficulty (N, M),
    masks (N, M, S, S) bool, valid (N, M), the objects' layout tokens (N, M, T), and the object
    counts (N,) on the CPU. Objects are in the dataset's stored order; `batch` shuffles them."""

    def __init__(self, dataset, device="cpu", images=True, progress=True):
        tok, M, S = dataset.tokenizer, dataset.max_objects, dataset.size
        if tok is None:
            raise ValueError("DecodedLayouts needs a dataset built with a tokenizer")
        N = len(dataset)
        self.counts = torch.zeros(N, dtype=torch.long)
        img = torch.zeros(N, 3, S, S, dtype=torch.uint8) if images else None
        boxes, labels = torch.zeros(N, M, 4), torch.zeros(N, M, dtype=torch.long)
        difficulty, masks = torch.zeros(N, M, dtype=torch.long), torch.zeros(
            N, M, S, S, dtype=torch.bool
        )
        for i in tqdm(range(N), desc="decoding the training images", leave=False,
                      disable=not progress):
            it = dataset.load(i)
            n = self.counts[i] = len(it["labels"])
            if images:
                img[i] = torch.from_numpy(it["image"].copy()).permute(2, 0, 1)
            boxes[i, :n] = torch.from_numpy(it["boxes"])
            labels[i, :n] = torch.from_numpy(it["labels"])
            difficulty[i, :n] = torch.tensor(difficulty_codes(dataset.attributes, it["ann_ids"]),
                                             dtype=torch.long)
            masks[i, :n] = torch.from_numpy(it["masks"])
        valid = torch.arange(M)[None] < self.counts[:, None]
        tensors = dict(images=img, boxes=boxes, labels=labels, difficulty=difficulty, masks=masks,
                       valid=valid,
                       # (N, M, T), stored order
                       obj_tokens=tok.object_tokens(boxes, labels, difficulty))
        nbytes = sum(v.numel() * v.element_size() for v in tensors.values() if v is not None)
        self.device, self.store = torch.device(device), storage_device(nbytes, device)
        pin = self.store.type == "cpu" and self.device.type == "cuda"
        for k, v in tensors.items():
            setattr(self, k, None if v is None else v.pin_memory() if pin else v.to(self.store))
        self.nbytes, self.max_objects, self.tok = nbytes, M, tok

    def __len__(self):
        return len(self.counts)

    def draw_orders(self, idx):
        """The object order of each image of the batch (B, M): a random permutation of its n objects
        (one torch.randperm(n) per image on the CPU's global generator, the item path's draw),
        padding slots after."""
        orders = torch.arange(self.max_objects).repeat(len(idx), 1)
        for b, n in enumerate(self.counts[idx].tolist()):
            orders[b, :n] = torch.randperm(n)
        return orders

    def batch(self, idx, orders=None):
        """The batch of images `idx` (a list or (B,) tensor) with its objects in `orders` (default:
        draw_orders), on the training device: image (B, 3, S, S) in [-1, 1] (when kept), tokens (B,
        L), boxes (B, M, 4), labels, difficulty (B, M), masks (B, M, S, S) float, valid (B, M)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        orders = self.draw_orders(idx) if orders is None else orders
        idx, o = idx.to(self.store), orders.to(self.store)                      # (B,), (B, M)
        i = idx[:, None]
        out = dict(boxes=self.boxes[i, o], labels=self.labels[i, o],
                   difficulty=self.difficulty[i, o],
                   masks=self.masks[i, o], valid=self.valid[i, o], slots=self.obj_tokens[i, o])
        if self.images is not None:
            out["image"] = self.images[idx]
        out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
        if "image" in out:
            out["image"] = out["image"].float().div(127.5).sub(1.0)       # to_model_range's mapping
        out["masks"] = out["masks"].float()
        # what encode gives, batched
        out["tokens"] = self.tok.sequence(out.pop("slots"), out["valid"])
        return out


# ----------------------------------------------------------------------------------------------
# 6. Data sets by name.

def resolve_data(name_or_path):
    """'shapes', 'coco_subset' (folders under data/, made by data_sets/) or a COCO-format folder."""
    if name_or_path in ("shapes", "coco_subset"):
        root = DATA_DIR / name_or_path
        if not (root / "annotations").is_dir():
            how = "`python -m data_sets shapes` (python detdiff.py and python sample.py make it on first use)" \
                if name_or_path == "shapes" else "`python -m data_sets coco-subset --coco /path/to/coco` (a local " \
                "COCO 2017 copy), or with --json FILE --images DIR"
            raise DataError(f"{root}: missing. Make it with {how}")
        return root
    root = Path(name_or_path)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder (expected "
                        f"annotations/instances_{{train,val}}.json and images)")
    return root


# ----------------------------------------------------------------------------------------------
# 7. Pictures: a layout drawn on its image, and grids of them (PIL only).

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
DIFFICULTY_COLOURS = {1: (0, 220, 0), 2: (255, 0, 0)}  # [easy] green, [hard] red


def draw_layout(image, boxes, labels, class_names, difficulty=None, scale=4):
    """uint8 (H, W, 3) image + boxes in [0, 1] -> PIL image enlarged `scale` times with boxes and
    names. Colour is per class, or green/red for [easy]/[hard] when difficulty is given."""
    im = Image.fromarray(np.asarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                   Image.NEAREST)
    d = ImageDraw.Draw(im)
    W, H = im.size
    for k, (box,
            c) in enumerate(zip(np.asarray(boxes, np.float64).reshape(-1, 4),
                                np.asarray(labels).reshape(-1))):
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
