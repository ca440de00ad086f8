"""config.py: --dtype auto against the CPU's flags, a dataclass as flags and back, and a module
saved with its config (an autoencoder file written before the move loads as it is; a file of another
kind is one line naming it)."""
import argparse
from dataclasses import dataclass

import pytest
import torch

import autoencoder
import config
from experiments import crops
from perceptive import detector


def test_dtype_auto_follows_the_cpu_flags(tmp_path):
    """auto -> bf16 only on a CPU with native bf16 (avx512_bf16 or amx_bf16), fp32 otherwise; an
    explicit dtype passes through; the flags are read from a cpuinfo file."""
    cpu = torch.device("cpu")
    assert config.resolve_dtype("auto", cpu, {"avx2", "avx512f", "avx512_bf16"})[0] == "bf16"
    assert config.resolve_dtype("auto", cpu, {"amx_bf16"})[0] == "bf16"
    dt, why = config.resolve_dtype("auto", cpu, {"avx2", "avx512f", "avx512bw"})
    assert dt == "fp32" and "no native bf16" in why
    assert config.resolve_dtype("bf16", cpu, set())[0] == "bf16"
    with pytest.raises(ValueError, match="--dtype"):
        config.resolve_dtype("int8", cpu)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: "
                    "1\nflags\t\t: fpu\n")
    assert {"fpu", "sse", "avx512f", "avx512_bf16"} == config.cpu_flags(info)
    assert config.cpu_flags(tmp_path / "missing") == set()


@dataclass
class Knobs:
    steps: int = 3
    lr: float = 0.1
    name: str = "a"
    flip: bool = True
    mults: tuple = (1, 2)


def test_flags_from_a_dataclass_and_back():
    p = argparse.ArgumentParser()
    config.add_flags(p, Knobs, skip=("name",))
    ns = p.parse_args(["--steps", "5", "--no-flip", "--mults", "1,2,4"])
    assert config.pick(ns, Knobs) == Knobs(steps=5, lr=0.1, name="a", flip=False, mults=(1, 2, 4))
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "b"])                                   # skipped: not a flag
    given = argparse.ArgumentParser()
    config.add_flags(given, Knobs, given_only=True)
    assert vars(given.parse_args(["--lr", "0.5"])) == {"lr": 0.5}  # only what the command line gave


class Tiny(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, 2)


def test_module_file_round_trip_and_a_file_without_its_kind_is_refused(tmp_path):
    torch.manual_seed(0)
    m = Tiny(3)
    config.save_module(tmp_path / "m.pt", "tiny", m, dict(width=3), note="x")
    back, f = config.load_module(tmp_path / "m.pt", "tiny", lambda c: Tiny(**c), "tiny module")
    assert f["note"] == "x" and not back.training
    assert torch.equal(back.lin.weight, m.lin.weight)
    # a file that does not say what it is (no kind) is not read as one
    torch.save(dict(model=m.state_dict(), cfg=dict(width=3)), tmp_path / "old.pt")
    with pytest.raises(config.DataError, match="not a tiny module .*kind is not 'tiny'"):
        config.load_module(tmp_path / "old.pt", "tiny", lambda c: Tiny(**c), "tiny module")


def test_a_missing_file_or_another_kind_is_one_line_naming_it(tmp_path):
    with pytest.raises(config.DataError, match=r"nope.pt: tiny module not found \(make one\)"):
        config.load_module(tmp_path / "nope.pt", "tiny", lambda c: Tiny(**c), "tiny module",
                           hint="make one")
    config.save_module(tmp_path / "m.pt", "other", Tiny(3), dict(width=3))
    with pytest.raises(config.DataError) as e:
        config.load_module(tmp_path / "m.pt", "tiny", lambda c: Tiny(**c), "tiny module")
    assert "m.pt: not a tiny module" in str(e.value) and "\n" not in str(e.value)


# ---- every kind of file the project writes loads with weights_only=True
# ----------------------------------------

def test_every_file_the_project_writes_loads_without_running_code(ckpt, tmp_path):
    """A generator checkpoint (with numpy's RNG state, allowed by name), a detector, an autoencoder
    and a crop classifier file all load with weights_only=True; a pickle that would run code is
    refused."""
    ck = config.load_file(ckpt)
    assert {"model", "ema", "opt", "rng",
            "train_cfg"} <= ck.keys() and ck["rng"][0]["numpy"][0] == "MT19937"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(ckpt, weights_only=True)                   # numpy's state needs the allow-list
    det = detector.Detector(detector.DetectorConfig(2, ("a", "b"), 32, width=8, dilations=(1,)))
    detector.save_detector(det, tmp_path / "detector.pt")
    ae = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(channels=4, factor=2))
    config.save_module(tmp_path / "autoencoder.pt", autoencoder.KIND, ae,
                       dict(channels=4, factor=2))
    clf = crops.CropClassifier(2, ("a", "b"), 4, 8, 0.1)
    crops.save_crop_classifier(clf, tmp_path / "crops.pt")
    for name in ("detector.pt", "autoencoder.pt", "crops.pt"):
        assert "state_dict" in torch.load(tmp_path / name, weights_only=True)

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from the file",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        config.load_file(tmp_path / "evil.pt")


def test_from_saved_drops_a_retired_setting_at_its_one_value_and_refuses_another():
    """The shipped checkpoint still names settings that have one value left (location 'grid', t_sampling
    'uniform'): they rebuild today's config; a checkpoint made with the removed form is a one-line error."""
    import train
    import unet
    saved = dict(vars(train.TrainConfig(lr=3e-3)), t_sampling="uniform", location="grid")
    assert config.from_saved(train.TrainConfig, saved) == train.TrainConfig(lr=3e-3)
    assert config.from_saved(unet.UNetConfig, dict(vars(unet.UNetConfig()), location="grid")) == unet.UNetConfig()
    with pytest.raises(config.DataError, match="--location: .*only 'grid' is left"):
        config.from_saved(unet.UNetConfig, dict(vars(unet.UNetConfig()), location="axis"))


def test_from_saved_gives_a_setting_added_later_the_value_older_checkpoints_were_made_with():
    """A checkpoint saved before --optimizer existed trained with AdamW: resuming it must not switch to
    today's default (Muon), whose state would not match the saved optimizer's."""
    import train
    saved = {k: v for k, v in vars(train.TrainConfig()).items() if k != "optimizer"}
    assert train.TrainConfig().optimizer == "muon"
    assert config.from_saved(train.TrainConfig, saved).optimizer == "adamw"
    assert config.from_saved(train.TrainConfig, dict(saved, optimizer="muon")).optimizer == "muon"
