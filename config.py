"""Configs in and out: a dataclass as command-line flags, a module saved with the config that
rebuilds it, and the device and dtype settings resolved against the hardware (the one device rule
every command follows).

Every setting in this project lives in a dataclass (`train.TrainConfig`, `unet.UNetConfig`, the main
job's `detdiff.PipelineConfig`, ...); `add_flags` makes each field a flag (`--pal-weight 0.1`,
`--no-fg-reweight`) and `pick` reads them back. Every trained module is one file that rebuilds it
alone: `save_module` / `load_module` (the detector, the crop classifier, the autoencoder; the
generator's checkpoint carries more, see `train.py`). Bad input of any kind (a file, a flag, a
setting) is a `DataError`: one line that names the file or the flag and the problem; the commands
print it as `error: ...` and exit 1. `RunLog` is the one log a run folder keeps.

    python detdiff.py --help                      # every flag add_flags made from TrainConfig and UNetConfig
"""
import argparse
import contextlib
import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


class DataError(ValueError):
    """Bad input: the message is one line naming the file (or the flag) and the problem."""


def read_json(path):
    """A json file, or a DataError naming it: missing, or not json."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed json ({e})") from None


class RunLog:
    """A run folder's log: each line printed above any progress bar and appended to `path`
    (log.txt). A process that is not the run's writer (a DDP rank other than 0: enabled=False) logs
    nothing."""

    def __init__(self, path, enabled=True):
        self.file = open(path, "a") if enabled else None

    def __call__(self, msg):
        if self.file is not None:
            tqdm.write(msg)
            self.file.write(msg + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


# --------------------------------------------------------------------------------------------------
# A dataclass as command-line flags

def add_flags(parser, cls, skip=(), only=None, given_only=False):
    """One flag per field of the dataclass `cls` (or of the `only` fields): --field-name, typed as
    the field; booleans get --x / --no-x, tuples read "1,2,4" (ints, or floats where the default
    holds floats); a field named in the class's CHOICES takes only those values (argparse says
    which, in one line, before anything runs).
    given_only: the default is argparse.SUPPRESS, so the parsed namespace holds only the flags given
    on the command line."""
    for f in only if only is not None else fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if given_only else f.default
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"default {f.default}")
        elif f.type in (tuple, "tuple"):     # the elements' type is the default's (ints if empty)
            cast = type(f.default[0]) if f.default else int
            parser.add_argument(flag, type=lambda s, cast=cast: tuple(cast(v) for v in s.split(",") if v),
                                metavar="A,B,..",
                                default=default, help=f"default {','.join(map(str, f.default))}")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=typ, default=default,
                                choices=getattr(cls, "CHOICES", {}).get(f.name),
                                help=f"default {f.default}")


def from_saved(cls, saved):
    """The settings dataclass `cls` from the dict a checkpoint saved. A setting that no longer exists because one
    value of it was all that stayed (cls.RETIRED, name -> that value) is dropped when it holds that value; any
    other value of it is a DataError, since today's code cannot rebuild what it made. A setting added
    after a checkpoint was made (cls.ADDED, name -> the value such checkpoints were made with) takes
    that value, not today's default."""
    saved, retired = dict(saved), getattr(cls, "RETIRED", {})
    saved = {**getattr(cls, "ADDED", {}), **saved}
    for name, kept in retired.items():
        if name in saved and saved.pop(name) != kept:
            raise DataError(f"--{name.replace('_', '-')}: this checkpoint was made with a form detdiff no longer "
                            f"has (only {kept!r} is left)")
    return cls(**saved)


def check_choices(cfg):
    """A settings dataclass built in code (not from flags) against its CHOICES: a one-line DataError
    naming the flag, the value and the choices, before anything runs."""
    for name, allowed in getattr(cfg, "CHOICES", {}).items():
        if getattr(cfg, name) not in allowed:
            raise DataError(f"--{name.replace('_', '-')} must be one of "
                            f"{', '.join(map(str, allowed))}, got {getattr(cfg, name)!r}")


def pick(ns, cls, **kw):
    """The dataclass `cls` from the fields a parsed namespace has (others keep their defaults), plus
    `kw`."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}, **kw)


# --------------------------------------------------------------------------------------------------
# A module saved with its config

def atomic_save(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)   # readers see the old or the new file, never half of one


# numpy's RNG state (an array) is the one thing a generator checkpoint holds beyond tensors and
# plain values
NUMPY_STATE = [getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct, np.ndarray,
               np.dtype,
               type(np.dtype(np.uint32))]


def load_file(path):
    """torch.load of a file this project wrote (a generator checkpoint, a module file) with
    weights_only=True, so that no code in the file runs: tensors, plain values and numpy's RNG-state
    arrays only."""
    with torch.serialization.safe_globals(NUMPY_STATE):
        return torch.load(path, map_location="cpu", weights_only=True)


def save_module(path, kind, module, config, **extra):
    """One file that rebuilds `module` alone: what it is (`kind`), its `config` (a dict of plain
    values), its weights, and any `extra` facts (plain values) a reader wants without building
    it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(dict(kind=kind, config=config, state_dict=module.state_dict(), **extra), path)


def load_module(path, kind, build, what, hint=""):
    """(module in eval mode, the file's dict) from a `save_module` file of this `kind`;
    `build(config)` makes the untrained module. A missing file, or a file of another kind, is a
    one-line DataError naming it and `what` it should be (`hint`: how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found" + (f" ({hint})" if hint else ""))
    try:
        f = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(f, dict) or f.get("kind") != kind:
            raise ValueError(f"kind is not {kind!r}")
        module = build(f["config"])
        module.load_state_dict(f["state_dict"])
    except Exception as e:
        raise DataError(f"{path}: not a {what} ({type(e).__name__}: {e})"[:300]) from None
    return module.eval(), f


# --------------------------------------------------------------------------------------------------
# The dtype setting


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags as the kernel lists them (Linux); an empty set where there is no such
    file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


def resolve_dtype(dtype, device, flags=None):
    """--dtype auto -> (dtype, why): bf16 autocast where the hardware computes in bf16 (a CUDA
    device that supports it; an x86 CPU with AVX-512 BF16 or AMX, read from /proc/cpuinfo), else
    fp32, because a CPU without bf16 instructions emulates them and runs many times slower than in
    fp32. Other values pass through."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if dtype != "auto":
        return dtype, "as asked"
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "auto: the GPU supports bf16") if ok else ("fp32", "auto: the GPU has no "
                                                                           "bf16")
    if device.type == "cpu":
        have = sorted({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else set(flags)))
        if have:
            return "bf16", f"auto: the CPU has {' and '.join(have)}"
        return "fp32", "auto: no native bf16 on this CPU (no avx512_bf16 / amx_bf16), fp32 is faster"
    return "fp32", f"auto: fp32 on {device.type}"


# --------------------------------------------------------------------------------------------------
# The device setting: one rule for every command


def resolve_device(spec="auto", local_rank=0):
    """--device -> (torch.device, why). auto: CUDA (cuda:LOCAL_RANK under torchrun) if there is one,
    else Apple's MPS, else the CPU. An explicit cuda / cuda:N / mps that this machine does not have
    is a one-line DataError; a bare "cuda" under torchrun means this process's GPU, cuda:LOCAL_RANK.
    "meta" (PyTorch's shape-only device) passes through: the tests run the device paths on it."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank), "auto: CUDA is available"
        if torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DataError(f"--device {spec}: not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {spec}: this machine has no CUDA device (torch "
                            f"{torch.__version__}); use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DataError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {spec}: Apple MPS is not available here; use --device cpu or "
                        f"auto")
    elif device.type not in ("cpu", "cuda", "mps", "meta"):
        raise DataError(f"--device {spec}: not supported (auto, cpu, cuda, cuda:N or mps)")
    return device, "as asked"


TORCH_DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
DTYPES = ("auto", *TORCH_DTYPES)   # every --dtype flag's choices


def sampling_dtype(dtype, device):
    """The dtype sampling runs in for a resolved training dtype: fp16 only on CUDA (elsewhere fp32),
    others as they are. The grid stage, experiments/evaluate.py and the periodic sample grids all sample this
    way."""
    return dtype if dtype != "fp16" or torch.device(device).type == "cuda" else "fp32"


def autocast(device, dtype):
    """The forward's autocast context for a resolved dtype (fp32 | bf16 | fp16): torch.autocast for
    a reduced dtype, a null context in fp32 (torch.autocast refuses some devices, meta among them,
    even when disabled)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=TORCH_DTYPES[dtype])
