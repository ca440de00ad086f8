"""Shared fixtures for the generator tests (issue 3): a tiny shapes data set and tiny model/run settings."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or otherwise slow tests (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 16 + 4 image shapes data set at 32 px (written once per session)."""
    return str(data.make_shapes(tmp_path_factory.mktemp("d") / "shapes", n_train=16, n_val=4, image_size=32,
                                progress=False))


TINY_MODEL = dict(base_channels=8, channel_mults=(1, 2), self_attn_levels=(1,), cross_attn_levels=(1,), heads=2,
                  d_model=16, enc_layers=1, enc_heads=2)


def tiny_train_cfg(data_root, out, **kw):
    import detdiff
    base = dict(data=data_root, out=str(out), steps=4, minutes=0.0, batch_size=4, warmup=2, image_size=16, bins=8,
                max_objects=4, log_every=1, sample_every=2, ckpt_every=2, sample_steps=2, n_grid=2,
                dtype="fp32", timesteps=50, device="cpu")
    base.update(kw)
    return detdiff.TrainConfig(**base)
