"""The perceptive model's commands: train detdiff's detector, score any detector's COCO mAP, label
every object of a data set [easy] / [hard].

    python -m perceptive train --data shapes --out runs/detector      # ~1 min on 2 cores, prints val mAP
    python -m perceptive eval --detector runs/detector/detector.pt --data shapes
    python -m perceptive eval --results my_dets.json --data DIR       # any detector's COCO results json
    python -m perceptive eval --torchvision fasterrcnn_resnet50_fpn --weights FILE --data coco_subset
    python -m perceptive attributes --data shapes --out runs/shapes   # attributes.json + summary + png
Each command takes --device (auto: CUDA, then Apple MPS, then the CPU) and prints the device it
uses; train and attributes take --dtype, the training's autocast (auto: bf16 where the hardware
computes in it, else fp32). Detections are always made in fp32, so an mAP or an attribute does not
move with the training dtype. """
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import config
import data
from config import DataError
from data_sets import shapes
from perceptive import coco_map, detections, detector
from perceptive.attributes import AttributeConfig, make_attributes


def _source(a, dataset, device):
    spec = a.results or (f"torchvision:{a.torchvision}" if a.torchvision else a.detector)
    return detections.open_source(spec, dataset.class_names, a.weights, a.detector_classes,
                                  dataset.category_ids,
                                  device)


def _device_flags(p, dtype=True):
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=config.DTYPES,
                       help="the training's autocast; auto: bf16 where the hardware computes in "
                            "it, else fp32")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m perceptive",
                                 description="detdiff's perceptive model: detector, COCO mAP, P.A. "
                                             "attributes")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the detector from scratch and report val mAP")
    t.add_argument("--data", default="shapes")
    t.add_argument("--out", default="runs/detector",
                   help="run folder (detector.pt is written there)")
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    config.add_flags(t, detector.DetTrainConfig)
    _device_flags(t)
    e = sub.add_parser("eval", help="COCO mAP / AP50 / AP75 of a detection source on a split")
    e.add_argument("--data", default="shapes")
    e.add_argument("--split", default="val")
    e.add_argument("--image-size", type=int, default=64)
    for p in (e,):
        p.add_argument("--detector", default="runs/detector/detector.pt",
                       help="a detdiff detector checkpoint")
        p.add_argument("--results",
                       help="a COCO results json from any detector (used instead of --detector)")
        p.add_argument("--torchvision",
                       help="a torchvision COCO detector name (used instead of --detector)")
        p.add_argument("--weights", help="local weights file for --torchvision (never downloaded)")
        p.add_argument("--detector-classes", default="",
                       help="data-set class=detector class,... where the "
                       "names differ (every data-set class must map to one of the detector's)")
    _device_flags(e, dtype=False)                 # nothing trains; detections are made in fp32
    at = sub.add_parser("attributes",
                        help="perception-aware attributes of a split (held-out folds by default)")
    at.add_argument("--data", default="shapes")
    at.add_argument("--out", default="runs/shapes",
                    help="run folder for attributes.json / .png (not the data)")
    at.add_argument("--detector",
                    help="label with this detector checkpoint instead of held-out folds")
    at.add_argument("--results", help="label with a COCO results json instead of held-out folds")
    at.add_argument("--torchvision",
                    help="label with a torchvision COCO detector instead of held-out folds")
    at.add_argument("--weights", help="local weights file for --torchvision")
    at.add_argument("--detector-classes", default="",
                    help="data-set class=detector class,... where names differ")
    config.add_flags(at, AttributeConfig)
    _device_flags(at)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device, why = config.resolve_device(a.device)
        if a.cmd == "eval":                       # nothing trains: detections are made in fp32
            print(f"device {device} ({why})")
        else:
            dtype, dtype_why = config.resolve_dtype(a.dtype, device)
            print(f"device {device} ({why}), dtype {dtype} ({dtype_why})")
        root = shapes.build_if_missing(a.data)
        if a.cmd == "train":
            tr = data.CocoLayoutDataset(root, "train", size=a.image_size)
            va = data.CocoLayoutDataset(root, "val", size=a.image_size)
            cfg = config.pick(a, detector.DetTrainConfig)
            t0 = time.time()
            model = detector.train(
                tr,
                detector.DetectorConfig(
                    len(tr.class_names), tuple(tr.class_names), a.image_size, a.width
                ),
                cfg,
                device=device,
                dtype=dtype,
            )
            secs = time.time() - t0
            detector.save_detector(model, Path(a.out) / "detector.pt")
            r = coco_map.evaluate(model, va, crowd_json=data.split_paths(root, "val")[0])
            print(f"trained in {secs:.0f}s; val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 "
                  f"{r['AP75']:.3f} -> {Path(a.out) / 'detector.pt'}")
        elif a.cmd == "eval":
            ds = data.CocoLayoutDataset(root, a.split, size=a.image_size)
            r = coco_map.evaluate(_source(a, ds, device), ds,
                                  crowd_json=data.split_paths(root, a.split)[0])
            print(f"{a.data}/{a.split}: mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 "
                  f"{r['AP75']:.3f}; per category "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["per_category"].items()))
        else:
            cfg = config.pick(a, AttributeConfig)
            source = None
            if a.detector or a.results or a.torchvision:
                probe = data.CocoLayoutDataset(root, "train", size=cfg.image_size,
                                               check_files=False)
                source = _source(a, probe, device)
            s = make_attributes(root, a.out, cfg, source, device=device, dtype=dtype)
            print(json.dumps(s, indent=1))
    except DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
