"""The COCO format written out: instance masks as compressed RLE, and data set folders that appear
all or nothing.

Reading a COCO-format folder (instances json, images, polygon and RLE masks) is the method's and
lives in data.py; what writes one lives here: the data sets (`shapes.py`, `coco_subset.py`) and
generated data (`export.py`).

  1. RLE:      `mask_to_rle` (pycocotools' compressed string; `data.rle_to_mask` decodes it)
  2. folders:  `private_tmp` + `publish`, a data set folder built aside and renamed into place

    python -m data_sets shapes --out /tmp/shapes   # a data set written through this file
"""
import shutil
import tempfile
from pathlib import Path

import numpy as np

from config import DataError


# ---------------------------------------------------------------------------------------------- 1.
# Instance masks as compressed RLE (column-major runs that start with a run of zeros, as
# pycocotools).


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


def mask_to_rle(mask):
    """bool (h, w) -> compressed COCO RLE dict (used when coco_subset resizes RLE masks)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts_to_rle_string(counts)}


# ----------------------------------------------------------------------------------------------
# 2. Writing a data set folder: built in a private folder beside it, then renamed into place.


def private_tmp(out):
    """A new temporary folder beside `out`, private to this process: two processes building the same
    data set at once (two notebooks, a test run beside the main job) never write into each other's
    files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(tmp, out):
    """Rename a finished `tmp` to `out`: all or nothing, an interrupted build leaves no half data
    set behind. If another process published `out` first, ours is discarded and a DataError says
    so."""
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():
            raise DataError(f"{out}: was written by another process while this one was building it") from None
        raise
    return out
