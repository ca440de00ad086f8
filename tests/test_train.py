"""The training loop of detdiff.py: overfit, every periodic branch, resume, run-folder safety, CLI, DDP."""
import json
import os
import socket

import pytest
import torch

import data
import detdiff
import unet
from conftest import TINY_MODEL, tiny_train_cfg


def test_one_batch_overfit():
    """Fixed x_0, t, eps and layout: L_simple must fall well below its start within a few dozen steps."""
    torch.manual_seed(0)
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=2)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL))
    d = detdiff.Diffusion(100)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, eps = torch.tensor([10, 30, 60, 90]), torch.randn(4, 3, 16, 16)
    tokens = torch.stack([tok.encode(torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([i % 2])) for i in range(4)])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = detdiff.loss_simple(m(d.q_sample(x0, t, eps), t, tokens), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::8]


def test_ema_update_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ref = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    detdiff.ema_update(a, b, 0.9)
    assert all(torch.allclose(p, r) for p, r in zip(a.parameters(), ref))


def test_lr_warmup_then_cosine():
    cfg = detdiff.TrainConfig(lr=1.0, warmup=10, min_lr_frac=0.1)
    assert detdiff.lr_at(cfg, 0, 0.0) == pytest.approx(0.1) and detdiff.lr_at(cfg, 9, 0.0) == pytest.approx(1.0)
    assert detdiff.lr_at(cfg, 50, 0.5) == pytest.approx(0.55) and detdiff.lr_at(cfg, 99, 1.0) == pytest.approx(0.1)


def test_batches_cover_each_epoch_and_split_across_ranks():
    n, B = 10, 5
    seen = [i for s in range(2) for i in detdiff.batch_indices(n, B, s, seed=3)]
    assert sorted(seen) == list(range(n))
    both = detdiff.batch_indices(n, B, 0, 3, rank=0, world=2) + detdiff.batch_indices(n, B, 0, 3, rank=1, world=2)
    assert sorted(both) == list(range(n))


def test_every_periodic_branch_runs(tiny_data, tmp_path):
    cfg = tiny_train_cfg(tiny_data, tmp_path / "run", steps=4, sample_every=2, ckpt_every=2)
    model = detdiff.train(cfg, TINY_MODEL)
    out = tmp_path / "run"
    for f in ("samples_000002.png", "samples_000004.png", "loss.png", "log.txt", "config.json", "ckpt.pt"):
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


def test_killed_and_resumed_run_matches_a_straight_run(tiny_data, tmp_path):
    straight = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "a", steps=6, ckpt_every=3, sample_every=0), TINY_MODEL)
    detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "b", steps=6, ckpt_every=3, sample_every=0), TINY_MODEL,
                  interrupt_at=4)                        # "killed" at step 4; the last checkpoint is step 3
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    resumed = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "b", steps=6, ckpt_every=3, sample_every=0,
                                           resume=True))
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    ca, cb = (torch.load(tmp_path / x / "ckpt.pt", weights_only=False) for x in ("a", "b"))
    assert ca["history"] == cb["history"]
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])


def test_existing_run_is_never_overwritten(tiny_data, tmp_path):
    detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=1, sample_every=0), TINY_MODEL)
    with pytest.raises(SystemExit, match="already holds a run"):
        detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "r", steps=1), TINY_MODEL)
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "empty", steps=1, resume=True))


def test_non_finite_loss_stops_naming_the_step(tiny_data, tmp_path, monkeypatch):
    real = detdiff.loss_simple
    calls = []

    def bad(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(detdiff, "loss_simple", bad)
    with pytest.raises(SystemExit, match="non-finite loss.*at step 3"):
        detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "n", steps=5, sample_every=0), TINY_MODEL)
    assert "at step 3" in (tmp_path / "n" / "log.txt").read_text()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_runs_finite(tiny_data, tmp_path, dtype):
    model = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / dtype, steps=2, sample_every=0, dtype=dtype,
                                         fg_reweight=True), TINY_MODEL)
    ck = torch.load(tmp_path / dtype / "ckpt.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert (ck["scaler"] != {}) == (dtype == "fp16")         # GradScaler only for fp16


def test_paper_flag_sets_the_papers_settings_under_explicit_flags():
    """--paper: token conditioning, lambda 0.01, plain L_simple on the linear schedule, no attribute-only dropout
    (each differs from the defaults); a flag given beside it wins; without it nothing is added."""
    t, m = detdiff.split_args(detdiff.parse_flags(["--paper", "--schedule", "cosine"]))
    assert m == {"cond": "tokens"}
    assert t == {"pal_weight": 0.01, "loss_weight": "none", "fg_reweight": False, "schedule": "cosine",
                 "p_uncond_attr": 0.0}
    t, m = detdiff.split_args(detdiff.parse_flags(["--paper"]))
    assert t["schedule"] == "linear" and not t["fg_reweight"]
    defaults = {**vars(detdiff.TrainConfig()), **vars(detdiff.UNetConfig())}
    assert all(defaults[k] != v for k, v in detdiff.PAPER_SETTINGS.items())
    assert detdiff.parse_flags(["--lr", "0.5"]) == {"lr": 0.5}


def test_cli_unknown_key_and_resume_guard(tiny_data, tmp_path):
    with pytest.raises(SystemExit):
        detdiff.build_parser().parse_args(["--no-such-flag", "1"])
    with pytest.raises(ValueError, match="unknown config keys"):
        detdiff.split_args({"lr": 1.0, "bogus": 2})
    args = vars(detdiff.build_parser().parse_args(["--steps", "3", "--channel-mults", "1,2", "--no-compile"]))
    assert args == {"steps": 3, "channel_mults": (1, 2), "compile": False}
    out = tmp_path / "c"
    detdiff.main(["--data", tiny_data, "--out", str(out), "--stage", "generator", "--steps", "1", "--batch-size", "2", "--image-size", "16",
                  "--timesteps", "20", "--sample-every", "0", "--sample-steps", "2", "--n-grid", "1", "--dtype", "fp32",
                  "--base-channels", "8", "--channel-mults", "1,2", "--d-model", "16", "--enc-layers", "1"])
    with pytest.raises(SystemExit, match="differ"):
        detdiff.main(["--out", str(out), "--resume", "--lr", "0.5"])
    detdiff.main(["--out", str(out), "--resume", "--steps", "2"])
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def _ddp_worker(rank, world, port, data_root, out, result_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = detdiff.train(tiny_train_cfg(data_root, out, steps=3, ckpt_every=2, sample_every=0), TINY_MODEL)
    torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_end_with_identical_weights(tiny_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, tiny_data, str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    init = unet.UNet(unet.UNetConfig(**torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model_cfg"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], init.state_dict()["conv_in.weight"])   # it did train
    assert len(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["rng"]) == 2


@pytest.mark.slow
def test_compile_path_trains_and_saves_the_unwrapped_model(tiny_data, tmp_path):
    """--compile (inductor here, the CUDA path's compiler too): same loss as eager at step 1, and the checkpoint
    holds the plain module's keys (no `_orig_mod.` prefix), so sample.py loads it without a prefix strip."""
    eager = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "e", steps=2, sample_every=0), TINY_MODEL)
    comp = detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "c", steps=2, sample_every=0, compile=True), TINY_MODEL)
    ck_e, ck_c = (torch.load(tmp_path / r / "ckpt.pt", weights_only=False) for r in ("e", "c"))
    assert set(ck_c["model"]) == set(ck_e["model"]) and not any("_orig_mod" in k for k in ck_c["model"])
    assert ck_c["history"]["loss"][0] == pytest.approx(ck_e["history"]["loss"][0], rel=1e-4)
    for k, v in comp.state_dict().items():
        assert torch.allclose(v, eager.state_dict()[k], atol=1e-4), k


def test_dtype_auto_follows_the_cpu_flags(tmp_path):
    """auto -> bf16 only on a CPU with native bf16 (avx512_bf16 or amx_bf16), fp32 otherwise; an explicit dtype
    passes through; the flags are read from a cpuinfo file."""
    cpu = torch.device("cpu")
    assert detdiff.resolve_dtype("auto", cpu, {"avx2", "avx512f", "avx512_bf16"})[0] == "bf16"
    assert detdiff.resolve_dtype("auto", cpu, {"amx_bf16"})[0] == "bf16"
    dt, why = detdiff.resolve_dtype("auto", cpu, {"avx2", "avx512f", "avx512bw"})
    assert dt == "fp32" and "no native bf16" in why
    assert detdiff.resolve_dtype("bf16", cpu, set())[0] == "bf16"
    with pytest.raises(ValueError, match="--dtype"):
        detdiff.resolve_dtype("int8", cpu)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert {"fpu", "sse", "avx512f", "avx512_bf16"} == detdiff.cpu_flags(info)
    assert detdiff.cpu_flags(tmp_path / "missing") == set()


def test_time_budget_without_a_step_cap(tiny_data, tmp_path):
    """--steps 0: the time budget alone ends the run (finished, and the log says so); with --minutes 0 too it is
    an error."""
    cfg = tiny_train_cfg(tiny_data, tmp_path / "r", steps=0, minutes=0.03, sample_every=0, ckpt_every=0)
    detdiff.train(cfg)
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=False)
    assert ck["finished"] and ck["step"] >= 1 and ck["elapsed"] >= 0.03 * 60
    assert "time budget of 0.03 minutes reached" in (tmp_path / "r" / "log.txt").read_text()
    with pytest.raises(SystemExit, match="--steps N"):
        detdiff.train(tiny_train_cfg(tiny_data, tmp_path / "r2", steps=0, minutes=0))
