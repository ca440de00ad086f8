"""The perceptive model: the detector DetDiffusion couples its generator to (docs/paper.md sections
2 and 4).

    detector.py     detdiff's CenterNet-style detector, trained from scratch
    detections.py   any detector behind one `predict` (torchvision's, a COCO results json), class mapping
    coco_map.py     COCO box mAP written out, `evaluate(source, dataset)`: the "YOLO score" of generated images
    attributes.py   the attribute stage: held-out folds label every object [easy] / [hard], the sidecar json

    python -m perceptive --help                   # train a detector, score one, label a data set's objects
"""
