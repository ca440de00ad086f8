"""Detections from any perceptive model behind one interface: detdiff's own detector (detector.py),
a torchvision COCO detector with weights from a local file, or a COCO results json made by any other
detector; and the mapping of a detector's classes onto the data set's.

This is how a user brings their own perceptive model (`python detdiff.py --detector SPEC`,
`open_source`): it then decides the perception-aware attribute (docs/paper.md section 2) and scores
generated images (section 4). Nothing is ever downloaded. A source that is a network (Detector,
TorchvisionDetector, Relabelled: nn.Modules) runs on the device it was moved to (`open_source(...,
device=)`, `.to(device)`) and returns its detections on the CPU.

    python -m perceptive eval --results my_dets.json --data DIR       # any detector's COCO results json
    python -m perceptive eval --torchvision fasterrcnn_resnet50_fpn --weights FILE --data coco_subset
"""
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models import detection

import config
from perceptive.detector import Detector, batches, device_of, load_detector, predict


def describe(source):
    """One line naming a detection source (kept in the attribute sidecar)."""
    if isinstance(source, Detector):
        n = sum(p.numel() for p in source.parameters())
        steps = getattr(getattr(source, "train_config", None), "steps", "?")
        return (f"detdiff CenterNet-style detector, {n / 1e6:.2f}M parameters, "
                f"{source.cfg.image_size} px, width {source.cfg.width}, {steps} steps")
    return getattr(source, "description", type(source).__name__)


class TorchvisionDetector(nn.Module):
    """A torchvision COCO detector (e.g. fasterrcnn_resnet50_fpn) with weights read from a local
    file only.

    The network is built with weights=None and loaded from `weights` (default: torch hub's
    checkpoint folder under the official file name); nothing is downloaded. COCO labels are mapped
    to the data set's classes by name; predictions of other COCO classes are dropped. """

    def __init__(self, name, class_names, weights=None, min_size=None, class_map=None):
        super().__init__()
        if name not in torchvision.models.list_models(module=detection):
            raise config.DataError(f"{name}: not a torchvision detection model (e.g. "
                                   f"fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, "
                                   f"fcos_resnet50_fpn, ssdlite320_mobilenet_v3_large)")
        meta = torchvision.models.get_model_weights(name).DEFAULT   # an enum: url and categories,
                                                                    # no download
        fname = meta.url.rsplit("/", 1)[-1]
        path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / fname
        if not path.is_file():
            raise config.DataError(f"{path}: weights file not found; put {fname} (from {meta.url}) "
                                   f"there or pass its path with --weights")
        categories = meta.meta["categories"]
        kw = dict(min_size=min_size) if min_size else {}
        self.model = getattr(detection, name)(weights=None, weights_backbone=None,
                                              num_classes=len(categories), **kw)
        try:
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise config.DataError(f"{path}: does not load into {name} ({type(e).__name__})") from None
        self.model.eval()
        self.label_map = class_mapping(categories, class_names, class_map, path)
        self.description = f"torchvision {name} (COCO weights {path})"

    @torch.no_grad()
    def predict(self, images, score_threshold=0.01, max_dets=100):
        """images (B, 3, H, W) in [-1, 1], on any device -> detections as Detector.predict's, on the
        CPU."""
        H, W = images.shape[-2:]
        x = images.to(device_of(self.model), torch.float32)
        out = []
        for r in self.model([(im + 1) / 2 for im in x]):           # torchvision wants [0, 1] images
            r = {k: v.cpu() for k, v in r.items()}
            keep = torch.tensor([int(l) in self.label_map for l in r["labels"]], dtype=torch.bool)
            keep &= r["scores"] > score_threshold
            order = r["scores"][keep].argsort(descending=True)[:max_dets]
            labels = torch.tensor([self.label_map[int(l)] for l in r["labels"][keep]],
                                  dtype=torch.long)[order]
            boxes = (r["boxes"][keep][order] / torch.tensor([W, H, W, H])).clamp(0, 1)
            out.append(dict(boxes=boxes, scores=r["scores"][keep][order], labels=labels))
        return out


class ResultsFile:
    """Detections a user made with any detector: a COCO results json, a list of
    {"image_id", "category_id", "bbox": [x, y, w, h] in the image's pixels, "score"}."""

    def __init__(self, path):
        self.path = Path(path)
        self.results = config.read_json(self.path)          # missing or malformed: DataError naming
                                                            # the file
        if not isinstance(self.results, list):
            raise config.DataError(f"{self.path}: a COCO results json is a list of detections")
        for i, r in enumerate(self.results):
            if not (isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys()
                    and len(r["bbox"]) == 4):
                raise config.DataError(f"{self.path}: result {i} lacks image_id, category_id, bbox "
                                       f"[x, y, w, h] or score")
        self.description = f"COCO results json {self.path}"

    def subset(self, image_ids):
        """The same file restricted to the detections of these images (e.g. one split of a two-split
        file)."""
        sub, keep = ResultsFile.__new__(ResultsFile), set(image_ids)
        sub.path, sub.description = self.path, self.description
        sub.results = [r for r in self.results if r["image_id"] in keep]
        return sub

    def detections(self, dataset):
        """{image_id: dict(boxes normalised xyxy, scores, labels)} for every image of `dataset`."""
        rec = {r["image_id"]: r for r in dataset.records}
        cat = {c: i for i, c in enumerate(dataset.category_ids)}
        per = defaultdict(list)
        for i, r in enumerate(self.results):
            if r["image_id"] not in rec:
                raise config.DataError(f"{self.path}: result {i} refers to image_id "
                                       f"{r['image_id']}, which the data set does not have")
            if r["category_id"] not in cat:
                raise config.DataError(f"{self.path}: result {i} has category_id "
                                       f"{r['category_id']}, which the data set does not have")
            W, H = rec[r["image_id"]]["width"], rec[r["image_id"]]["height"]
            x, y, w, h = (float(v) for v in r["bbox"])
            per[r["image_id"]].append(([x / W, y / H, (x + w) / W, (y + h) / H], float(r["score"]),
                                       cat[r["category_id"]]))
        out = {}
        for image_id in rec:
            d = per.get(image_id, [])
            out[image_id] = dict(boxes=torch.tensor([b for b, _, _ in d],
                                                    dtype=torch.float64).reshape(-1, 4),
                                 scores=torch.tensor([s for _, s, _ in d], dtype=torch.float64),
                                 labels=torch.tensor([c for _, _, c in d], dtype=torch.long))
        return out


def parse_class_map(spec):
    """'sofa=couch,tv=tvmonitor' -> {'sofa': 'couch', 'tv': 'tvmonitor'} (data-set class = detector
    class)."""
    if isinstance(spec, dict):
        return spec
    pairs = [p.split("=") for p in (spec or "").split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise config.DataError(f"--detector-classes {spec!r}: expected data-set class=detector "
                               f"class, comma-separated")
    return {a.strip(): b.strip() for a, b in pairs}


def class_mapping(detector_names, data_names, class_map=None, where="detector"):
    """{detector label index: data-set class index}: every class of the data set must be one of the
    detector's, by name or through `class_map` {data-set class: detector class}. A detector that
    lacks one of the data set's classes never finds its objects, so the attribute would call all of
    them hard: that is an error naming the missing classes and the fix. Detector classes without a
    data-set class are dropped."""
    cmap, det = parse_class_map(class_map), list(detector_names)
    bad = sorted(set(cmap) - set(data_names))
    if bad:
        raise config.DataError(f"{where}: --detector-classes maps {', '.join(bad)}, which the data "
                               f"set does not have (its classes: {', '.join(data_names)})")
    want = {c: cmap.get(c, c) for c in data_names}
    missing = [c for c, d in want.items() if d not in det]
    if missing:
        shown = ", ".join(det[:12]) + (f", ... ({len(det)} in all)" if len(det) > 12 else "")
        raise config.DataError(f"{where}: the detector has no class "
                               f"{', '.join(repr(want[c]) for c in missing)} for the data set's "
                               f"{', '.join(missing)} (its classes: {shown}); map them with "
                               f"--detector-classes {missing[0]}=<its class>,... or use a detector "
                               f"trained on these classes")
    return {det.index(want[c]): k for k, c in enumerate(data_names)}


class Relabelled(nn.Module):
    """A detdiff Detector trained on other classes (or another order), its labels mapped to the data
    set's."""

    def __init__(self, detector, label_map):
        super().__init__()
        self.detector, self.label_map = detector, label_map
        self.description = describe(detector) + f", classes mapped {label_map}"

    def predict(self, images, score_threshold=0.01, max_dets=100):
        out = []
        for d in self.detector.predict(images, score_threshold, max_dets):
            dev = d["labels"].device
            keep = torch.tensor([int(k) in self.label_map for k in d["labels"]], dtype=torch.bool,
                                device=dev)
            labels = torch.tensor([self.label_map[int(k)] for k in d["labels"][keep]],
                                  dtype=torch.long, device=dev)
            out.append(dict(boxes=d["boxes"][keep], scores=d["scores"][keep], labels=labels))
        return out


def open_source(spec, class_names, weights="", class_map="", category_ids=None, device="cpu"):
    """A perceptive model a user brings, checked against the data set's classes: `spec` is a detdiff
    detector checkpoint (.pt), a COCO results json (.json) made on the data set's own images, or
    torchvision:NAME (with `weights` the local weights file). Nothing is downloaded. A network is
    moved to `device` (a results json has no device)."""
    if spec.startswith("torchvision:"):
        return TorchvisionDetector(spec.split(":", 1)[1], class_names, weights or None,
                                   class_map=class_map).to(device)
    if spec.endswith(".json"):
        res = ResultsFile(spec)
        if category_ids is not None:
            bad = sorted({r["category_id"] for r in res.results} - set(category_ids))
            if bad:
                raise config.DataError(f"{spec}: category_id {', '.join(map(str, bad[:8]))} of the "
                                       f"results are not the data set's (its ids: "
                                       f"{', '.join(map(str, category_ids))}); a results json uses "
                                       f"the ids of the data set's instances json")
        return res
    det = load_detector(spec).to(device)
    m = class_mapping(det.cfg.class_names, class_names, class_map, spec)
    return det if tuple(det.cfg.class_names) == tuple(class_names) else Relabelled(det, m)


def stage_settings(ck):
    """The main job's stage settings a generator checkpoint carries (detdiff.PipelineConfig as a
    dict: detector, det_size, det_steps, ...); a checkpoint from before they were split off the
    generator's has them in train_cfg."""
    settings = ck.get("pipeline_cfg") or ck["train_cfg"]
    if "det_size" not in settings:
        raise config.DataError("the checkpoint has no detector settings (trained by train.py "
                               "alone); evaluate a run folder of `python detdiff.py`")
    return settings


def input_side(settings, image_size):
    """The side at which the run's perceptive model sees real and generated images. detdiff's own
    detector sees --det-size, the side it is trained at. A torchvision detector (--detector
    torchvision:NAME) was trained on full-size photographs and resizes every image itself (its
    min_size), so it gets the data at the generator's own side, image_size (never below --det-size):
    shrunk to --det-size first, its [hard] would measure the lost resolution, not the object."""
    if str(settings.get("detector", "")).startswith("torchvision:"):
        return max(settings["det_size"], image_size)
    return settings["det_size"]


def run_detector(run, settings, class_names, category_ids, device="cpu"):
    """The perceptive model of a `python detdiff.py` run folder, on `device`: the user's
    (--detector, kept in the run's stage settings) or the one its detector stage trained
    (RUN/detector.pt)."""
    if settings.get("detector"):
        return open_source(settings["detector"], class_names, settings.get("detector_weights", ""),
                           settings.get("detector_classes", ""), category_ids, device)
    return load_detector(Path(run) / "detector.pt").to(device)


def detect_dataset(source, dataset, indices=None, batch_size=64, score_threshold=0.01,
                   max_dets=100):
    """{image_id: dict(boxes (n, 4) normalised xyxy, scores, labels)} for the images of `dataset`
    (or `indices`), from a Detector, a TorchvisionDetector or a ResultsFile; on the CPU whatever the
    source's device (a source's `predict` takes the CPU batches to its own device)."""
    if isinstance(source, ResultsFile):
        dets = source.detections(dataset)
        ids = {dataset.records[i]["image_id"] for i in (range(len(dataset)) if indices is None else indices)}
        return {k: v for k, v in dets.items() if k in ids}
    out = {}
    for batch in batches(dataset, batch_size, indices, shuffle=False, drop_last=False):
        for image_id, det in zip(batch["image_id"].tolist(),
                                 predict(source, batch["image"], score_threshold, max_dets)):
            out[image_id] = det
    return out
