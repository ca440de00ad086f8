"""Every tensor the training device sees is made on it: the generator's side (UNet, perception head
and L_p, the training step, guidance and the samplers) runs on PyTorch's `meta` device, where a CPU
tensor mixed into an op raises as it would on CUDA. The float32 forms of the schedule's quantities
(MPS has no float64) against float64 references, and the one device rule of every command."""
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import config
import data
import diffusion
import optim
import perception
import sample
import train
import unet
from data_sets import shapes
from conftest import TINY_MODEL

META = torch.device("meta")


class NoFloat64(TorchDispatchMode):
    """Records every op that makes a float64 tensor on the meta device (Apple's MPS has no
    float64)."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += [str(func) for o in tree_leaves(out)
                     if isinstance(o,
                                   torch.Tensor) and o.device == META and o.dtype == torch.float64]
        return out


def tiny(cond="paint", **kw):
    tok = data.LayoutTokenizer(shapes.SHAPES, bins=8, max_objects=4)
    return unet.UNet(unet.UNetConfig.for_tokenizer(tok, **dict(TINY_MODEL, cond=cond, **kw))), tok


def meta_batch(tok, B=2, S=16, M=4):
    tokens = torch.stack([tok.encode(torch.tensor([[0.1, 0.1, 0.6, 0.7]]), torch.tensor([2]),
                                     torch.tensor([2]))] * B)
    return dict(image=torch.zeros(B, 3, S, S, device=META), tokens=tokens.to(META),
                boxes=torch.zeros(B, M, 4, device=META),
                valid=torch.ones(B, M, dtype=torch.bool, device=META),
                masks=torch.zeros(B, M, S, S, device=META))


# --------------------------------------------------------------------------------------------------
# The device rule

@pytest.mark.parametrize("cuda, mps, want",
                         [(True, True, "cuda:0"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    device, why = config.resolve_device("auto")
    assert str(device) == want and why.startswith("auto")


def test_auto_under_torchrun_takes_the_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert config.resolve_device("auto", local_rank=1)[0] == torch.device("cuda", 1)
    assert config.resolve_device("cuda", local_rank=1)[0] == torch.device("cuda", 1)
    assert config.resolve_device("cuda:0", local_rank=1)[0] == torch.device("cuda", 0)


@pytest.mark.parametrize("spec, says", [("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"),
                                        ("mps", "MPS is not available"), ("tpu", "not a device")])
def test_a_device_the_machine_lacks_is_a_one_line_error(monkeypatch, spec, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(config.DataError) as e:
        config.resolve_device(spec)
    assert says in str(e.value) and f"--device {spec}" in str(e.value) and "\n" not in str(e.value)


def test_fp32_needs_no_autocast_and_bf16_gets_one():
    # torch.autocast refuses meta
    assert not isinstance(config.autocast(META, "fp32"), torch.autocast)
    amp = config.autocast("cpu", "bf16")
    with amp:
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


# --------------------------------------------------------------------------------------------------
# The generator on the meta device

@pytest.mark.parametrize("cond", ["tokens", "paint"])
def test_unet_forward_on_meta(cond):
    model, tok = tiny(cond)
    model = model.to(META)
    b = meta_batch(tok)
    eps, aux = model(b["image"], torch.zeros(2, dtype=torch.long, device=META), b["tokens"],
                     return_features=True)
    assert eps.device == META and eps.shape == (2, 3, 16, 16) and aux["mask_logits"].shape == (2, 4, 16, 16)


def test_mask_head_and_perception_loss_on_meta():
    head = perception.MaskHead([16, 8], 16, 8).to(META)
    feats = [torch.zeros(2, 16, 8, 8, device=META), torch.zeros(2, 8, 16, 16, device=META)]
    logits = head(feats, torch.zeros(2, 4, 16, device=META))
    l_p = perception.perception_loss(logits, torch.zeros(2, 4, 16, 16, device=META),
                                     torch.ones(2, 4, dtype=torch.bool, device=META),
                                     torch.rand(2, device=META))
    assert logits.shape == (2, 4, 16, 16) and l_p.device == META and l_p.shape == (2,)


@pytest.mark.parametrize("loss_weight, fg, optimizer",
                         [("minsnr", True, "adamw"), ("none", False, "adamw"),
                                                       ("minsnr", True, "muon")])
def test_train_step_on_meta(loss_weight, fg, optimizer):
    model, tok = tiny()
    raw = model.to(META)
    cfg = train.TrainConfig(timesteps=50, loss_weight=loss_weight, fg_reweight=fg, p_uncond=0.5,
                            p_uncond_attr=0.5, optimizer=optimizer)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = optim.make_optimizer(raw, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    diff = diffusion.Diffusion(50, "cosine").to(META)
    with NoFloat64() as f64:
        out = train.train_step(raw, raw, ema, opt, scaler, diff, config.autocast(META, "fp32"),
                               meta_batch(tok),
                               tok.null_prompt().to(META), cfg, 0)
    assert all(t.device == META for t in out) and f64.ops == []


def test_guidance_and_one_step_of_each_sampler_on_meta():
    model, tok = tiny()
    model = model.to(META).eval()
    diff = diffusion.Diffusion(50, "cosine").to(META)
    b = meta_batch(tok)
    x, t = torch.zeros(2, 3, 16, 16, device=META), torch.full((2,), 30, device=META)
    with torch.no_grad():
        eps, probs = sample.guided_eps(model, x, t, b["tokens"], tok.null_prompt().to(META), 3.0,
                                       attr_guidance=5.0,
                                       masks=True)
    assert eps.device == META and probs.shape == (2, 4, 16, 16)
    with NoFloat64() as f64:
        x0, eps2 = diffusion.x0_and_eps(diff, x, t, eps, clip=True)
        steps = [diffusion.ddpm_step(diff, x, t, eps, torch.zeros_like(x)),
                 diffusion.ddim_step(diff, x, t, torch.full_like(t, 20), eps, torch.zeros_like(x),
                                     eta=0.5),
                 diffusion.ddim_step(diff, x, t, torch.full_like(t, -1), eps, torch.zeros_like(x)),
                 diffusion.dpm2m_step(diff, x, t, 20, x0)[0],
                 diffusion.dpm2m_step(diff, x, t, 20, x0, x0,
                                      torch.ones(2, 1, 1, 1, device=META))[0]]
    assert all(s.device == META and s.shape == x.shape for s in steps) and f64.ops == []


# --------------------------------------------------------------------------------------------------
# float32 where float64 was: against float64 references

def test_timestep_embedding_in_float32_is_within_2e4_of_float64():
    t = torch.arange(1000)
    omega = 1.0 / 10000 ** (torch.arange(64, dtype=torch.float64) / 64)
    ang = t.double()[:, None] * omega[None]
    ref = torch.cat([ang.sin(), ang.cos()], 1)                      # the float64 table, (1000, 128)
    got = unet.timestep_embedding(t, 128, unet.frequencies(128))
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 2e-4


def test_the_position_table_is_the_sincos_2d_of_the_pixel_centres():
    block = unet.AttnBlock(32, 16, 2, self_attn=False, cross_attn=True)
    for side in (4, 16):
        c = (torch.arange(side, dtype=torch.float64) + 0.5) / side
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        # float64 throughout
        ref = unet.sincos_2d(torch.stack([xs.flatten(), ys.flatten()], 1), 32, side)
        assert torch.allclose(block.position_table(side, side), ref, atol=1e-6)


def test_min_snr_weight_in_float32_matches_float64():
    ab = diffusion.Diffusion(1000, "cosine").alpha_bar
    snr = ab.double() / (1 - ab.double())
    ref = snr.clamp(max=5.0) / snr
    got = diffusion.min_snr_weight(ab, 5.0).flatten()
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-6, atol=0)


def test_dpm_solver_in_float32_stays_within_1e5_of_float64():
    """A float64 DPM-Solver++ (2M) written out here, on the Gaussian test problem's x_0
    estimates."""
    diff, g = diffusion.Diffusion(1000, "cosine"), torch.Generator().manual_seed(0)
    ts = diffusion.logsnr_grid(diff, 20)
    x = torch.randn(4, 1, 4, 4, generator=g)
    ref = x.double()
    x0_last = h_last = None
    ref_last = ref_h = None
    ab = diff.alpha_bar.double()
    lam = 0.5 * (ab.log() - (1 - ab).log())
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        # a Gaussian's posterior mean, shaped
        x0 = 0.5 * x / (ab[t] * 0.25 + 1 - ab[t]).sqrt().float()
        x0_ref = 0.5 * ref / (ab[t] * 0.25 + 1 - ab[t]).sqrt()
        x, h_last = diffusion.dpm2m_step(diff, x, torch.full((4,), t), s, x0, x0_last, h_last)
        x0_last = x0
        if s < 0:
            ref = x0_ref
            break
        h = lam[s] - lam[t]
        D = (
            x0_ref
            if ref_last is None
            else (1 + 1 / (2 * ref_h / h)) * x0_ref - 1 / (2 * ref_h / h) * ref_last
        )
        ref = ((1 - ab[s]) / (1 - ab[t])).sqrt() * ref - ab[s].sqrt() * math.expm1(-h) * D
        ref_last, ref_h = x0_ref, h
    assert x.dtype == torch.float32 and (x.double() - ref).abs().max() < 1e-5


def test_the_tables_built_once_stay_out_of_checkpoints():
    """Checkpoints written before the tables became buffers load strictly: the buffers are not
    persistent."""
    model, _ = tiny("paint")
    names = {n for n, _ in model.named_buffers()}
    assert "t_freqs" in names and any(n.endswith("pos_1d") for n in names)
    state = model.state_dict()
    assert not any(k.endswith(("t_freqs", "pos_1d")) for k in state)
    fresh, _ = tiny("paint")
    fresh.load_state_dict(state, strict=True)
