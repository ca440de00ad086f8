"""Shared fixtures: tiny shapes data sets, tiny model / run / detector settings, and the one-line
error check."""
import sys
from dataclasses import fields
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detdiff
import train
from data_sets import shapes


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: multi-process or otherwise slow tests (deselect with -m 'not "
                            "slow')")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 16 + 4 image shapes data set at 32 px (written once per session)."""
    return str(shapes.make_shapes(tmp_path_factory.mktemp("d") / "shapes", n_train=16, n_val=4,
                                  image_size=32,
                                  progress=False))


TINY_MODEL = dict(base_channels=8, channel_mults=(1, 2), self_attn_levels=(1,),
                  cross_attn_levels=(1,), heads=2,
                  d_model=16, enc_layers=1, enc_heads=2)


def tiny_train_cfg(data_root, out, **kw):
    base = dict(data=data_root, out=str(out), steps=4, minutes=0.0, batch_size=4, warmup=2,
                image_size=16, bins=8,
                max_objects=4, log_every=1, sample_every=2, ckpt_every=2, sample_steps=2, n_grid=2,
                dtype="fp32", timesteps=50, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def tiny_run_cfgs(data_root, out, **kw):
    """(TrainConfig, PipelineConfig) of a tiny main job: the settings in kw go to the one that has
    the field."""
    pnames = {f.name for f in fields(detdiff.PipelineConfig)}
    return (tiny_train_cfg(data_root, out, **{k: v for k, v in kw.items() if k not in pnames}),
            detdiff.PipelineConfig(**{k: v for k, v in kw.items() if k in pnames}))


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory):
    """32 training + 8 validation shapes images at 32 px."""
    return shapes.make_shapes(tmp_path_factory.mktemp("p") / "shapes", n_train=32, n_val=8,
                              image_size=32,
                              progress=False)


TINY_DETECTOR = dict(width=16, dilations=(1, 2))


def one_line_naming(err, path):
    msg = str(err.value)
    return str(path) in msg and "\n" not in msg


@pytest.fixture(scope="session")
def ckpt(tiny_data, tmp_path_factory):
    """A generator checkpoint of 2 steps on tiny_data (TINY_MODEL)."""
    out = tmp_path_factory.mktemp("s") / "run"
    train.train(tiny_train_cfg(tiny_data, out, steps=2, sample_every=0), TINY_MODEL)
    return out / "ckpt.pt"


TINY_STAGES = dict(det_steps=6, det_size=32, attr_steps=3, attr_folds=2, n_eval=4, n_grid=3)
