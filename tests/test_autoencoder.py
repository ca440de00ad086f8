"""autoencoder.py, latent mode: the autoencoder, its latent scale, the perception loss on the latent
grid, a tiny latent run end to end, the wrong-autoencoder error, and an autoencoder file from before
the re-layout."""
from data_sets import export
import pytest
import torch

import autoencoder
import config
import detdiff
import perception
import train
from experiments import evaluate
from conftest import TINY_MODEL, TINY_STAGES, one_line_naming, tiny_run_cfgs, tiny_train_cfg

TINY_AE = dict(ae_steps=6, ae_channels=4, ae_factor=4, ae_latent_channels=4)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_encode_decode_shapes(factor):
    ae = autoencoder.Autoencoder(
        autoencoder.AutoencoderConfig(channels=4, latent_channels=3, factor=factor)
    ).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 3, 32 // factor, 32 // factor)
    y = ae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_autoencoder_bad_sizes():
    with pytest.raises(ValueError, match="power of 2, got 3"):
        autoencoder.Autoencoder(autoencoder.AutoencoderConfig(factor=3))
    ae = autoencoder.Autoencoder(autoencoder.AutoencoderConfig(channels=4, factor=4))
    with pytest.raises(ValueError, match=r"not divisible by the autoencoder's factor 4"):
        ae.encode(torch.zeros(1, 3, 18, 18))


def test_psnr_against_hand_value():
    # 0.1 apart in [0, 1]: MSE 0.01, 20 dB
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.2)
    assert autoencoder.psnr(a, b) == pytest.approx(20.0, abs=1e-4)
    b[1] = 0.02                                             # 0.01 apart: 40 dB; the mean of the two
    assert autoencoder.psnr(a, b) == pytest.approx(30.0, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_ae(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "autoencoder.pt"
    info = autoencoder.train_autoencoder(tiny_train_cfg(tiny_data, path.parent, **TINY_AE),
                                         tiny_data, path,
                                         log=lambda m: None)
    return path, info


def test_latent_scale_gives_unit_variance(tiny_ae, tiny_data):
    """The stored scale makes the encoder's latents of the training images unit-variance (SD's
    0.18215 idea)."""
    path, info = tiny_ae
    ae, fp = autoencoder.load_autoencoder(path)
    import data
    ds = data.CocoLayoutDataset(tiny_data, "train", size=16)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        z = ae.encode(x)
        raw = ae.encoder(x)
    assert z.shape == (len(ds), 4, 4, 4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    assert ae.scale.item() == pytest.approx(1 / raw.std().item(), rel=1e-4) and info["scale"] != 1.0
    assert fp == torch.load(path, weights_only=False)["fingerprint"] and len(fp) == 12


def test_perception_loss_on_the_latent_grid():
    """Instance masks at image resolution are area-pooled to the head's latent grid: a box that
    covers half of a latent cell gives a target of 0.5 there. Checked against the loss on a
    hand-made 4 x 4 target."""
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, 0:6, 4:12] = 1                  # rows 0-5: latent row 0 full, row 1 half; cols
                                                # 4-11: latent cols 1, 2
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, 1:3], target[0, 0, 1, 1:3] = 1.0, 0.5
    logits, valid, ab = (
        torch.randn(1, 1, 4, 4),
        torch.ones(1, 1, dtype=torch.bool),
        torch.tensor([0.64]),
    )
    got = perception.perception_loss(logits, masks, valid, ab)
    ref = 0.8 * (perception.mask_bce(logits, target) + perception.mask_dice(logits, target))[:, 0]
    assert torch.allclose(got, ref, atol=1e-6)


def test_tiny_latent_run_end_to_end(tiny_ae, tiny_data, tmp_path):
    ae_path, _ = tiny_ae
    cfg = tiny_train_cfg(tiny_data, tmp_path / "run", space="latent", autoencoder=str(ae_path),
                         **TINY_AE)
    model = train.train(cfg, TINY_MODEL)
    assert model.cfg.in_channels == 4                            # the UNet learns 4-channel latents
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ck["space"] == "latent" and ck["autoencoder"]["fingerprint"] == autoencoder.load_autoencoder(ae_path)[1]
    with torch.no_grad():
        _, aux = model(torch.randn(2, 4, 4, 4), torch.tensor([1, 2]),
                       torch.zeros(2, model.cfg.seq_len).long(),
                       return_features=True)
    assert aux["mask_logits"].shape[-2:] == (4, 4)          # the perception head on the latent grid
    export.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--n", "3", "--steps", "2", "--out",
                 str(tmp_path / "s")])
    from PIL import Image
    im = Image.open(tmp_path / "s" / "train" / "00000.png")
    assert im.size == (16, 16)                                          # decoded to the image size


def test_wrong_autoencoder_is_an_error(tiny_ae, tiny_data, tmp_path):
    ae_path, _ = tiny_ae
    run = tmp_path / "run"
    train.train(tiny_train_cfg(tiny_data, run, space="latent", autoencoder=str(ae_path), **TINY_AE),
                TINY_MODEL)
    other = tmp_path / "other.pt"
    autoencoder.train_autoencoder(tiny_train_cfg(tiny_data, tmp_path, seed=1, **TINY_AE), tiny_data,
                                  other,
                                  log=lambda m: None)
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    with pytest.raises(config.DataError,
                       match=r"other.pt: autoencoder \w+ is not the one .*ckpt.pt was trained") as e:
        autoencoder.checkpoint_autoencoder(ck, run / "ckpt.pt", str(other))
    assert one_line_naming(e, other)
    # resuming with it, too
    with pytest.raises(config.DataError, match=r"other.pt: autoencoder \w+ is not the one"):
        train.train(tiny_train_cfg(tiny_data, run, space="latent", autoencoder=str(other),
                                   resume=True, steps=6,
                                   **TINY_AE), TINY_MODEL)
    with pytest.raises(config.DataError, match=r"none.pt: detdiff autoencoder not found") as e:
        autoencoder.checkpoint_autoencoder(ck, run / "ckpt.pt", str(tmp_path / "none.pt"))
    assert one_line_naming(e, tmp_path / "none.pt")
    with pytest.raises(config.DataError,
                       match=r"pixel/ckpt.pt: a pixel-space checkpoint takes no --autoencoder"):
        autoencoder.checkpoint_autoencoder(dict(space="pixel"), tmp_path / "pixel" / "ckpt.pt",
                                           str(other))
    assert autoencoder.checkpoint_autoencoder(dict(space="pixel"),
                                              tmp_path / "pixel" / "ckpt.pt") is None


def test_latent_main_job_and_its_evaluation(tiny_data, tmp_path):
    """--space latent through the whole main job (the autoencoder stage before the generator) and
    experiments/evaluate.py on the run: the ablation generators learn on the same frozen autoencoder."""
    out = tmp_path / "run"
    s = detdiff.pipeline(*tiny_run_cfgs(tiny_data, out, space="latent", **TINY_STAGES, **TINY_AE),
                         TINY_MODEL)
    assert (out / "autoencoder.pt").is_file() and s["autoencoder"]["latent_shape"] == [4, 4, 4]
    assert (out / "autoencoder.png").is_file()               # val images over their reconstructions
    assert "autoencoder latents [4, 4, 4], val PSNR" in (out / "log.txt").read_text()
    M = evaluate.evaluate(out, evaluate.EvalConfig(quick=True, parts="fidelity", ablations=True,
                                                   inception=str(out / "none.pt")))
    fp = torch.load(out / "ckpt.pt", weights_only=False)["autoencoder"]["fingerprint"]
    ck = torch.load(out / "ablations" / "loss_off" / "ckpt.pt", weights_only=False)
    assert ck["space"] == "latent" and ck["autoencoder"]["fingerprint"] == fp
    assert 0 <= M["fidelity_map50"] <= 1 and M["ablations"]["loss off"]["pal_weight"] == 0


def test_image_gradients_of_the_edge_term():
    """The autoencoder's optional edge term compares finite differences: checked on a hand-made
    ramp."""
    x = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 5.0]])[None, None]     # (1, 1, 2, 3)
    dx, dy = autoencoder.image_gradients(x)
    assert dx.tolist() == [[[[1.0, 2.0], [2.0, 3.0]]]] and dy.tolist() == [[[[0.0, 1.0, 2.0]]]]
