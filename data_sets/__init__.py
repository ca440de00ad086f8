"""The data sets detdiff trains on and the data sets it writes: what serves the method (data.py
reads them all).

    shapes.py       the embedded default data set `shapes` (procedural, nuisances that make detection hard)
    coco_subset.py  a small resized subset of COCO 2017 or of any instances json
    coco.py         the COCO format written out: compressed RLE masks, folders that appear all or nothing
    export.py       generated images as COCO and YOLO folders, layout json files; `python sample.py`'s command line

    python -m data_sets --help                    # make shapes, make a COCO subset, or look at a data set
"""
