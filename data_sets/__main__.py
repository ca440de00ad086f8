"""The data set commands: make `shapes`, make a COCO subset, look at a data set.

    python -m data_sets shapes                         # writes data/shapes (a few seconds)
    python -m data_sets show --data shapes --out x.png # 16 images with their boxes, counts per category
    python -m data_sets coco-subset --coco /path/coco  # writes data/coco_subset from a local COCO 2017 copy
"""
import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

import data
from config import DataError
from data_sets import coco_subset, shapes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_sets",
                                description="detdiff data: build the default `shapes` "
                                "set, a COCO subset, or look at a data set.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shapes",
                       help="generate the procedural `shapes` data set in COCO format (seconds)")
    s.add_argument("--out", default=str(data.DATA_DIR / "shapes"),
                   help="folder to create (must not exist)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same data set")
    s.add_argument("--train", type=int, default=2000, help="training images")
    s.add_argument("--val", type=int, default=300, help="validation images")
    s.add_argument("--image-size", type=int, default=64, help="side of the written PNGs")
    c = sub.add_parser("coco-subset",
                       help="build data/coco_subset from a local COCO copy or any instances json")
    c.add_argument("--coco",
                   help="COCO 2017 root with annotations/instances_{train,val}2017.json, "
                        "train2017/, val2017/")
    c.add_argument("--json", help="any instances json (then split deterministically by image id)")
    c.add_argument("--images", help="image folder for --json")
    c.add_argument("--out", default=str(data.DATA_DIR / "coco_subset"),
                   help="folder to create (must not exist)")
    c.add_argument("--categories", default=",".join(coco_subset.DEFAULT_COCO_CATEGORIES),
                   help="comma-separated names")
    c.add_argument("--size", type=int, default=128, help="side S the images are resized to")
    c.add_argument("--min-area", type=float, default=0.02,
                   help="drop objects whose box is under this image fraction")
    c.add_argument("--max-objects", type=int, default=8,
                   help="keep at most this many (largest) objects")
    c.add_argument("--max-images", type=int, default=None,
                   help="at most this many images per split")
    v = sub.add_parser("show", help="draw 16 images with their boxes and print counts per category")
    v.add_argument("--data", default="shapes", help="shapes, coco_subset or a COCO-format folder")
    v.add_argument("--split", default="train")
    v.add_argument("--n", type=int, default=16, help="images in the grid")
    v.add_argument("--size", type=int, default=64, help="resolution S to load at")
    v.add_argument("--out", default="docs/shapes_grid.png",
                   help="PNG to write (an existing file is an error)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "shapes":
            t0 = time.time()
            root = shapes.make_shapes(a.out, a.seed, a.train, a.val, a.image_size)
            print(f"wrote {root} in {time.time() - t0:.1f} s")
        elif a.cmd == "coco-subset":
            root = coco_subset.build_coco_subset(a.out, a.coco, a.json, a.images,
                                                 a.categories.split(","), a.size,
                                                 a.min_area, a.max_objects, a.max_images)
            print(f"wrote {root}")
        else:
            out = Path(a.out)
            if out.exists():
                raise DataError(f"{out}: already exists; choose another --out")
            ds = data.CocoLayoutDataset(shapes.build_if_missing(a.data), a.split, size=a.size)
            counts = np.bincount(np.concatenate([ds.load(i)["labels"] for i in range(len(ds))]),
                                 minlength=len(ds.class_names))
            print(f"{a.data}/{a.split}: {len(ds)} images; objects per category: "
                  + ", ".join(f"{n} {k}" for n, k in zip(ds.class_names, counts)))
            tiles = [data.draw_layout(data.from_model_range(it["image"]), it["boxes"], it["labels"],
                                      ds.class_names)
                     for it in (ds[i] for i in range(min(a.n, len(ds))))]
            out.parent.mkdir(parents=True, exist_ok=True)
            data.image_grid(tiles).save(out)
            print(f"wrote {out}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
