"""The COCO format on disk: instances json, instance masks (polygons, RLE), images, and all-or-nothing folders.

Everything that reads or writes COCO's own encodings lives here, with no pycocotools needed; `data.py` builds
the model's view (images at S x S, layouts, tokens) on top of it.

  1. errors:   `DataError`, a one-line message naming the file and the problem; `open_rgb` for any image COCO ships
  2. masks:    COCO polygons and RLE (compressed and uncompressed) decoded and encoded (`polygon_to_mask`,
               `rle_to_mask`, `mask_to_rle`, `resize_mask`)
  3. reading:  `split_paths`, `read_json`, `load_coco` (check an instances json, one record per image)
  4. writing:  `private_tmp` + `publish`, a data set folder built aside and renamed into place

A COCO-format folder is `ROOT/annotations/instances_{split}.json` plus images in `ROOT/{split}/`
(COCO 2017's own names, `instances_{split}2017.json` and `{split}2017/`, work too).

    python data.py show --data DIR                # reads a COCO-format folder through this file, draws 16 images
"""
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("detdiff.data")


# ----------------------------------------------------------------------------------------------
# 1. Bad input, and images as RGB.

class DataError(ValueError):
    """Bad input: the message is one line naming the file and the problem."""


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
# 3. Reading an instances json and its images.


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


# ----------------------------------------------------------------------------------------------
# 4. Writing a data set folder: built in a private folder beside it, then renamed into place.


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
