"""The trained model that ships with the repository in checkpoints/shapes/: the one command that
makes it, and the checks that keep it loadable by today's code (tests/test_ship.py runs them in CI).

    python -m tools.ship                            # train it (the main job at 5000 generator steps into runs/shapes_ship),
                                              # evaluate it, export it to checkpoints/shapes: 48 min on a 2-core CPU
                                              # with bf16 (README); in fp32 the generator alone takes about 1.5 h
    python -m tools.ship --run runs/shapes_ship     # export a run that is already trained (evaluated here if it is not)
    python -m tools.ship --check                    # the shipped files against today's code and defaults

What checkpoints/shapes/ holds (about 4 MB):
  ckpt.pt             the generator: its EMA weights only, stored in float16 (sample.load_checkpoint copies them into
                      a float32 UNet), with its config, tokenizer and schedule settings. No optimizer, raw weights or
                      RNG state: it samples, it does not resume.
  detector.pt         the run's perceptive model: the detector behind the attributes and experiments/evaluate.py's "YOLO score"
  attributes.json     the attribute sidecar: [easy] / [hard] for every train and val object (docs/paper.md section 2)
  crop_classifier.pt  experiments/evaluate.py's crop classifier (class consistency), and sample.py's --classifier
  metrics.json, report.md, easy_hard_eval.png   experiments/evaluate.py's report on the model (the README quotes it)

A change to the UNet's modules or to a default that the model was trained with makes `--check` (and
CI) fail and name what moved; the model is then retrained with `python -m tools.ship`, never patched. """
import argparse
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import config
import detdiff
import perception
import sample
from experiments import crops, evaluate
from perceptive import detector
from train import TrainConfig
from unet import UNetConfig

ROOT = Path(__file__).resolve().parent.parent   # the repository
SHIPPED = ROOT / "checkpoints" / "shapes"
RUN = "runs/shapes_ship"
RECIPE = ["--minutes", "0", "--steps", "5000"]          # the main job's defaults otherwise
PARTS = "fidelity,easy_hard,crops,masks"               # experiments/evaluate.py's parts quoted in the README
REPORT = ("metrics.json", "report.md", "easy_hard_eval.png")
# settings that say how a run was driven, not what it learned: they may differ from today's defaults
# (and sampling settings, which the sampler takes from its own flags)
RUN_ONLY = {"out", "resume", "steps", "minutes", "log_every", "sample_every", "ckpt_every",
            "device", "dtype",
            "compile", "attributes", "n_eval", "evaluate", "stage", "sampler", "sample_steps",
            "guidance",
            "attr_guidance", "n_grid"}


def slim_checkpoint(ck):
    """A finished run's checkpoint -> the shipped one: the EMA weights in float16 and what sampling
    reads."""
    keep = ("step", "elapsed", "finished", "train_cfg", "model_cfg", "pipeline_cfg", "img_s",
            "space", "dtype",
            "autoencoder", "tokenizer", "history")
    out = {k: ck[k] for k in keep if k in ck}
    out["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["ema"].items()}
    # beside it (load_checkpoint)
    out["attributes_used"] = "attributes.json" if ck.get("attributes_used") else ""
    return out


def refuse_a_full(dest):
    """The shipped folder is replaced only by hand: a folder that holds anything is a DataError
    naming it."""
    if Path(dest).exists() and any(Path(dest).iterdir()):
        raise config.DataError(f"{dest}: already holds a model; remove the folder to replace it")


def export(run, dest=SHIPPED):
    """Copy a finished, evaluated run into `dest` (a new or empty folder): the slim generator, the
    detector, the attribute sidecar, experiments/evaluate.py's crop classifier and report. Returns the files
    written."""
    run, dest = Path(run), Path(dest)
    if not (run / "ckpt.pt").is_file():
        raise config.DataError(f"{run / 'ckpt.pt'}: missing; export a finished `python detdiff.py` "
                               f"run folder")
    ck = config.load_file(run / "ckpt.pt")
    if not ck.get("finished"):
        raise config.DataError(f"{run / 'ckpt.pt'}: the run has not finished (step "
                               f"{ck.get('step')}); finish it first")
    sources = {"detector.pt": run / "detector.pt", "attributes.json": run / "attributes.json",
               "crop_classifier.pt": run / "eval" / "crop_classifier.pt",
               **{f: run / f for f in REPORT}}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise config.DataError(f"{missing[0]}: missing; run `python -m experiments.evaluate --run {run} "
                               f"--parts {PARTS}` first")
    refuse_a_full(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config.atomic_save(slim_checkpoint(ck), dest / "ckpt.pt")
    for name, src in sources.items():
        shutil.copyfile(src, dest / name)
    return sorted(dest.iterdir())


def drift(ck):
    """The settings of a checkpoint that differ from what today's defaults would build: one 'FLAG:
    shipped X, default Y' line each (empty when the model is today's default model)."""
    # a setting added after the checkpoint was made counts at the value it was made with
    defaults = [(ck["model_cfg"], asdict(UNetConfig()), detdiff.model_fields()),
                ({**TrainConfig.ADDED, **ck["train_cfg"]}, asdict(TrainConfig()), fields(TrainConfig)),
                (ck.get("pipeline_cfg") or {}, asdict(detdiff.PipelineConfig()),
                 fields(detdiff.PipelineConfig))]
    # noqa: E731 (a json list, a tuple)
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    return [
        f"--{f.name.replace('_', '-')}: shipped {stored[f.name]!r}, default {default[f.name]!r}"
        for stored, default, fs in defaults
        for f in fs
        if f.name not in RUN_ONLY
        and f.name in stored
        and as_list(stored[f.name]) != as_list(default[f.name])
    ]


def check(folder=SHIPPED):
    """Every shipped file loads with today's code (the generator strictly) and the generator's
    settings are today's defaults. Returns the problems found, one line each."""
    folder, problems = Path(folder), []
    loaders = {"ckpt.pt": sample.load_checkpoint, "detector.pt": detector.load_detector,
               "crop_classifier.pt": crops.load_crop_classifier,
               "attributes.json": lambda p: perception.load_attributes(p, "train")}
    for name, load in loaders.items():
        try:
            load(folder / name)
        except (config.DataError, OSError) as e:
            problems.append(str(e))
    if (folder / "ckpt.pt").is_file():
        problems += [f"{folder / 'ckpt.pt'}: {d}" for d in drift(config.load_file(folder / "ckpt.pt"))]
    return problems


def size_mb(folder=SHIPPED):
    return sum(p.stat().st_size for p in Path(folder).iterdir()) / 2 ** 20


def main(argv=None):
    ap = argparse.ArgumentParser(description="Make, export or check the shipped model in "
                                             "checkpoints/shapes.")
    ap.add_argument("--run", default="", help="export this finished run instead of training one")
    ap.add_argument("--dest", default=str(SHIPPED), help="the folder to write (new or empty)")
    ap.add_argument("--check", action="store_true",
                    help="check the shipped files against today's code")
    a = ap.parse_args(argv)
    try:
        if a.check:
            problems = check(a.dest)
            print("\n".join(problems) or f"{a.dest}: loads with today's code and matches today's "
                                         f"defaults ({size_mb(a.dest):.1f} MB)")
            return 1 if problems else 0
        refuse_a_full(a.dest)                        # before half an hour of training, not after it
        run = Path(a.run or RUN)
        if not a.run:
            detdiff.main(["--out", str(run)] + RECIPE)
        if not all((run / f).is_file() for f in ("metrics.json", "eval/crop_classifier.pt")):
            evaluate.evaluate(run, evaluate.EvalConfig(parts=PARTS))
        export(run, a.dest)
        print(f"wrote {a.dest} ({size_mb(a.dest):.1f} MB) from {run}; its numbers: "
              f"{run / 'report.md'}")
    except config.DataError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
