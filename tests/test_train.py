"""train.py: the generator's training loop: overfit, the default loss weights, every periodic
branch, resume, run-folder safety, reduced precision, DDP, compile."""
import json
import os
import socket

import pytest
import torch

import config
import data
import diffusion
import train
import unet
from conftest import TINY_MODEL, tiny_train_cfg


def test_one_batch_overfit():
    """Fixed x_0, t, eps and layout: L_simple must fall well below its start within a few dozen
    steps."""
    torch.manual_seed(0)
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=2)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL))
    d = diffusion.Diffusion(100, "linear")
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, eps = torch.tensor([10, 30, 60, 90]), torch.randn(4, 3, 16, 16)
    tokens = torch.stack([tok.encode(torch.tensor([[0.1, 0.1, 0.6, 0.6]]),
                                     torch.tensor([i % 2])) for i in range(4)])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = diffusion.loss_simple(m(d.q_sample(x0, t, eps), t, tokens), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_every_periodic_branch_runs(tiny_data, tmp_path):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "run", steps=4, sample_every=2, ckpt_every=2)
    model = train.train(cfg, TINY_MODEL)
    out = tmp_path / "run"
    for f in ("samples_000002.png", "samples_000004.png", "log.txt", "config.json", "ckpt.pt"):
        assert (out / f).is_file(), f
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 4 and len(ck["history"]["loss"]) == 4
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])
    assert all(torch.equal(ck["model"][k], v) for k, v in model.state_dict().items())
    # EMA moved away from the initial weights but is not the raw model (decay < 1)
    ema, raw = ck["ema"]["conv_in.weight"], ck["model"]["conv_in.weight"]
    assert not torch.equal(ema, raw)
    log = (out / "log.txt").read_text()
    assert "step 4 loss" in log and "done" in log
    json.loads((out / "config.json").read_text())
    assert not (out / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_killed_and_resumed_run_matches_a_straight_run(tiny_data, tmp_path, optimizer):
    kw = dict(steps=6, ckpt_every=3, sample_every=0, optimizer=optimizer)
    straight = train.train(tiny_train_cfg(tiny_data, tmp_path / "a", **kw), TINY_MODEL)
    train.train(tiny_train_cfg(tiny_data, tmp_path / "b", **kw), TINY_MODEL,
                interrupt_at=4)                  # "killed" at step 4; the last checkpoint is step 3
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    resumed = train.train(tiny_train_cfg(tiny_data, tmp_path / "b", resume=True, **kw))
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    ca, cb = (torch.load(tmp_path / x / "ckpt.pt", weights_only=False) for x in ("a", "b"))
    assert ca["history"] == cb["history"]
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])


def test_existing_run_is_never_overwritten(tiny_data, tmp_path):
    train.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=1, sample_every=0), TINY_MODEL)
    with pytest.raises(config.DataError, match="already holds a run"):
        train.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=1), TINY_MODEL)
    with pytest.raises(config.DataError, match="empty.ckpt.pt: no checkpoint to resume"):
        train.train(tiny_train_cfg(tiny_data, tmp_path / "empty", steps=1, resume=True))


def test_non_finite_loss_stops_naming_the_step(tiny_data, tmp_path, monkeypatch):
    real = diffusion.loss_simple
    calls = []

    def bad(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(diffusion, "loss_simple", bad)
    with pytest.raises(FloatingPointError, match="non-finite loss.*at step 3"):
        train.train(tiny_train_cfg(tiny_data, tmp_path / "n", steps=5, sample_every=0), TINY_MODEL)
    assert "at step 3" in (tmp_path / "n" / "log.txt").read_text()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_runs_finite(tiny_data, tmp_path, dtype):
    model = train.train(tiny_train_cfg(tiny_data, tmp_path / dtype, steps=2, sample_every=0,
                                       dtype=dtype,
                                       fg_reweight=True), TINY_MODEL)
    ck = torch.load(tmp_path / dtype / "ckpt.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert (ck["scaler"] != {}) == (dtype == "fp16")         # GradScaler only for fp16


def _ddp_worker(rank, world, port, data_root, out, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = train.train(tiny_train_cfg(data_root, out, steps=3, ckpt_every=2, sample_every=0),
                        TINY_MODEL)
    torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_end_with_identical_weights(tiny_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker,
                                args=(2, port, tiny_data, str(tmp_path / "run"), str(tmp_path)),
                                nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = unet.UNet(unet.UNetConfig(**torch.load(tmp_path / "run" / "ckpt.pt",
                                                  weights_only=False)["model_cfg"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], init.state_dict()["conv_in.weight"])  # it did train
    assert len(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["rng"]) == 2


@pytest.mark.slow
def test_compile_path_trains_and_saves_the_unwrapped_model(tiny_data, tmp_path):
    """--compile (inductor here, the CUDA path's compiler too): same loss as eager at step 1, and
    the checkpoint holds the plain module's keys (no `_orig_mod.` prefix), so sample.py loads it
    without a prefix strip."""
    eager = train.train(tiny_train_cfg(tiny_data, tmp_path / "e", steps=2, sample_every=0),
                        TINY_MODEL)
    comp = train.train(tiny_train_cfg(tiny_data, tmp_path / "c", steps=2, sample_every=0,
                                      compile=True), TINY_MODEL)
    ck_e, ck_c = (torch.load(tmp_path / r / "ckpt.pt", weights_only=False) for r in ("e", "c"))
    assert set(ck_c["model"]) == set(ck_e["model"]) and not any("_orig_mod" in k for k in ck_c["model"])
    assert ck_c["history"]["loss"][0] == pytest.approx(ck_e["history"]["loss"][0], rel=1e-4)
    for k, v in comp.state_dict().items():
        assert torch.allclose(v, eager.state_dict()[k], atol=1e-4), k


def test_time_budget_without_a_step_cap(tiny_data, tmp_path):
    """--steps 0: the time budget alone ends the run (finished, and the log says so); with --minutes
    0 too it is an error."""
    cfg = tiny_train_cfg(tiny_data, tmp_path / "r", steps=0, minutes=0.03, sample_every=0,
                         ckpt_every=0)
    train.train(cfg)
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=False)
    assert ck["finished"] and ck["step"] >= 1 and ck["elapsed"] >= 0.03 * 60
    assert "time budget of 0.03 minutes reached" in (tmp_path / "r" / "log.txt").read_text()
    with pytest.raises(config.DataError, match="--steps N"):
        train.train(tiny_train_cfg(tiny_data, tmp_path / "r2", steps=0, minutes=0))


def test_default_train_step_multiplies_foreground_and_min_snr_weights():
    """The default loss weighs every pixel's squared error by GeoDiffusion's foreground weight times
    Min-SNR-5's w_t: train_step's L_simple equals that computed here from the same draws (prompt
    dropout, t, eps)."""
    import copy
    import data
    import unet
    cfg = train.TrainConfig(timesteps=50, pal_weight=0.0)
    assert cfg.fg_reweight and cfg.loss_weight == "minsnr"         # the defaults this test is about
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=2)
    torch.manual_seed(0)
    model = unet.UNet(unet.UNetConfig.for_tokenizer(tok, base_channels=8, channel_mults=(1, 2),
                                                    self_attn_levels=(1,),
                                                    cross_attn_levels=(1,), heads=2, d_model=16,
                                                    enc_layers=1,
                                                    enc_heads=2, mask_dim=0))
    before = copy.deepcopy(model)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
                          [[0.25, 0.5, 1.0, 1.0], [0, 0, 0.5, 0.25]]])
    valid = torch.tensor([[True, False], [True, True]])
    tokens = torch.stack([tok.encode(b[v], torch.tensor([0, 1])[: int(v.sum())]) for b,
                          v in zip(boxes, valid)])
    batch = dict(image=torch.rand(2, 3, 8, 8) * 2 - 1, tokens=tokens, boxes=boxes, valid=valid)
    diff = diffusion.Diffusion(50, cfg.schedule)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    _, l_simple, _ = train.train_step(model, model, copy.deepcopy(model), opt, scaler, diff,
                                      torch.autocast("cpu", enabled=False), batch,
                                      tok.null_prompt(), cfg, 0)
    torch.manual_seed(1)                                     # the same draws, in train_step's order
    torch.rand(2)                     # attribute-only dropout's draw (the prompts hold only [none])
    drop = torch.rand(2) < cfg.p_uncond
    t = torch.randint(0, 50, (2,))
    eps = torch.randn(2, 3, 8, 8)
    x_t = diff.alpha_bar[t].sqrt().view(2, 1, 1,
                                        1) * batch["image"] + (1 - diff.alpha_bar[t]).sqrt().view(2, 1, 1, 1) * eps
    prompt = torch.where(drop[:, None], tok.null_prompt()[None], tokens)
    err = ((before(x_t, t, prompt) - eps) ** 2).mean(1)          # (2, 8, 8) per-pixel squared error
    snr = diff.alpha_bar[t] / (1 - diff.alpha_bar[t])
    w_t = torch.minimum(snr, torch.tensor(5.0)) / snr                   # Min-SNR-5 (eps-prediction)
    c = (torch.arange(8) + 0.5) / 8                                            # pixel centres
    fg = torch.ones(2, 8, 8)
    for i in range(2):                                     # w / area^0.2 inside a box, smaller wins
        for j in torch.argsort(
            -(boxes[i, :, 2] - boxes[i, :, 0]) * (boxes[i, :, 3] - boxes[i, :, 1])
        ):
            if valid[i, j]:
                x0, y0, x1, y1 = boxes[i, j].tolist()
                area = (x1 - x0) * (y1 - y0)
                inside = (
                    (c[None, :] >= x0) & (c[None, :] < x1) & (c[:, None] >= y0) & (c[:, None] < y1)
                )
                fg[i][inside] = 2.0 / area ** 0.2
        fg[i] /= fg[i].mean()
    expected = (err * fg * w_t.view(2, 1, 1)).mean()
    assert l_simple.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kw, says",
                         [(dict(image_size=30), "--image-size 30 is not divisible by 4"),
                                      (dict(image_size=36, channel_mults=(1, 2, 2, 2)),
                                       "not divisible by 8"),
                                      (dict(space="latent", image_size=40), "the latent side 10"),
                                      (dict(space="latent", image_size=64, ae_factor=3),
                                       "--ae-factor 3: must be a")])
def test_sizes_the_unet_cannot_divide_are_one_line_errors(kw, says):
    mults = kw.pop("channel_mults", None)
    with pytest.raises(config.DataError) as e:
        train.check_sizes(train.TrainConfig(**kw), dict(channel_mults=mults) if mults else None)
    assert says in str(e.value) and "\n" not in str(e.value)
    train.check_sizes(train.TrainConfig(image_size=32))                         # the default passes
    train.check_sizes(train.TrainConfig(image_size=64, space="latent"))
