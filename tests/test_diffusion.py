"""Schedule, forward process, posterior and the losses of detdiff.py against brute-force / closed-form references."""
import math

import pytest
import torch

import data
import detdiff
import sample


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_monotone_and_brute_force_product(kind):
    d = detdiff.Diffusion(1000, kind)
    betas = detdiff.make_betas(kind, 1000).tolist()
    prod, ref = 1.0, []
    for b in betas:                      # alpha_bar_t = prod_{s <= t} (1 - beta_s), a plain python loop
        prod *= 1.0 - b
        ref.append(prod)
    assert torch.allclose(d.alpha_bar.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all() and 0 < d.alpha_bar[-1] < d.alpha_bar[0] < 1
    assert d.alpha_bar.dtype == torch.float32


def test_linear_betas_are_ddpm_values():
    b = detdiff.make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_matches_step_by_step_forward_process(t):
    torch.manual_seed(0)
    d = detdiff.Diffusion(1000, "linear")
    n = 16000
    x0 = torch.linspace(-1, 1, 4).repeat(n, 1)                             # (n, 4): 4 different pixel values
    x = x0.double().clone()
    for s in range(t + 1):               # q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s), DDPM Eq. (2)
        b = d.betas[s].double()
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn_like(x)
    closed = d.q_sample(x0, torch.full((n,), t), torch.randn_like(x0))
    for samples in (x, closed):
        ab = math.prod(1 - float(b) for b in detdiff.make_betas("linear", 1000)[: t + 1])
        assert torch.allclose(samples.mean(0).float(), math.sqrt(ab) * x0[0], atol=0.03)
        assert torch.allclose(samples.var(0).float(), torch.full((4,), 1 - ab), rtol=0.05, atol=2e-5)


@pytest.mark.parametrize("t", [1, 5, 100, 999])
def test_posterior_mean_and_variance_match_gaussian_bayes(t):
    d = detdiff.Diffusion(1000, "cosine")
    betas = detdiff.make_betas("cosine", 1000)
    ab_prev, beta = torch.prod(1 - betas[:t]), betas[t]                     # float64 brute force
    x0, x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    # q(x_{t-1} | x_0) q(x_t | x_{t-1}) as a product of Gaussians in x_{t-1}
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean_ref = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta) / prec
    mean, var = d.posterior(x0.float(), x_t.float(), torch.full((3,), t))
    assert torch.allclose(mean.double(), mean_ref, atol=1e-4)
    assert torch.allclose(var.double().flatten(), (1 / prec).expand(3), rtol=1e-4)


def test_posterior_at_t0_is_x0():
    d = detdiff.Diffusion(100)
    x0, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, var = d.posterior(x0, x_t, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t", [1, 37, 500, 999])
def test_ddim_eta1_single_step_equals_ddpm_step(t, clip):
    d = detdiff.Diffusion(1000, "linear")
    g = torch.Generator().manual_seed(t)
    x_t, eps, z = (torch.randn(2, 3, 8, 8, generator=g) * 1.5 for _ in range(3))
    tt = torch.full((2,), t)
    a = sample.ddpm_step(d, x_t, tt, eps, z, clip)
    b = sample.ddim_step(d, x_t, tt, tt - 1, eps, z, eta=1.0, clip=clip)
    assert torch.allclose(a, b, atol=1e-3)   # float32; 1 - alpha_bar_1 ~ 3e-4 amplifies rounding at t = 1


def test_last_step_adds_no_noise():
    d = detdiff.Diffusion(100)
    x_t, eps, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    x0 = d.predict_x0(x_t, t, eps).clamp(-1, 1)
    assert torch.allclose(sample.ddpm_step(d, x_t, t, eps, z), sample.ddpm_step(d, x_t, t, eps, 0 * z))
    assert torch.allclose(sample.ddim_step(d, x_t, t, t - 1, eps, z, eta=1.0), x0, atol=1e-5)


def test_loss_simple_hand_value_and_weight():
    eps, pred = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    assert detdiff.loss_simple(pred, eps).item() == pytest.approx((1 + 4 + 0 + 1) / 4)
    w = torch.tensor([[[[2.0, 0.0], [1.0, 1.0]]]])
    assert detdiff.loss_simple(pred, eps, w).item() == pytest.approx((2 + 0 + 0 + 1) / 4)


def test_foreground_weight_hand_values():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]]])            # one quarter-image box + padding
    valid = torch.tensor([[True, False]])
    w = detdiff.foreground_weight(boxes, valid, 4)                          # (1, 1, 4, 4)
    fg = 2 / 0.25 ** 0.2                                                    # w / area^p
    ref = torch.ones(4, 4)
    ref[:2, :2] = fg
    ref = ref / ref.mean()
    assert torch.allclose(w[0, 0], ref, atol=1e-5) and w.mean().item() == pytest.approx(1.0)


def test_drop_condition_rate_and_content():
    torch.manual_seed(0)
    tokens, null = torch.arange(12).repeat(20000, 1) + 100, torch.arange(12)
    out = detdiff.drop_condition(tokens, null, 0.1)
    dropped = (out == null).all(1)
    assert ((out == tokens).all(1) | dropped).all()
    assert 0.09 < dropped.float().mean().item() < 0.11
    assert (detdiff.drop_condition(tokens[:50], null, 0.0) == tokens[:50]).all()


def test_drop_attributes_replaces_only_the_attribute_tokens():
    tok = data.LayoutTokenizer(["a", "b", "c"], bins=8, max_objects=3)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    tokens = torch.stack([tok.encode(boxes, torch.tensor([0, 2]), torch.tensor([1, 2]))] * 20000)  # [easy], [hard]
    plain = tok.encode(boxes, torch.tensor([0, 2]), torch.tensor([0, 0]))                         # both [none]
    assert torch.equal(detdiff.drop_attributes(tokens[:3], 1.0), plain.expand(3, -1))
    assert torch.equal(detdiff.drop_attributes(tokens[:3], 0.0), tokens[:3])
    out = detdiff.drop_attributes(tokens, 0.3, torch.Generator().manual_seed(0))
    dropped = (out == plain).all(1)
    assert ((out == tokens).all(1) | dropped).all()                    # all of a prompt's attributes, or none of them
    assert 0.29 < dropped.float().mean().item() < 0.31
    assert tok.decode(out[dropped][0])["labels"].tolist() == [0, 2]    # the layout itself is untouched


def test_extract_broadcasts_float32():
    a = torch.arange(10, dtype=torch.float32)
    out = detdiff.extract(a, torch.tensor([3, 7]), torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32 and out.flatten().tolist() == [3.0, 7.0]


def test_min_snr_weight_by_hand():
    """w_t = min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t): SNR 1 -> 1, 9 -> 5/9, 99 -> 5/99,
    1/3 -> 1 (gamma 5); gamma 1 at SNR 9 -> 1/9."""
    ab = torch.tensor([0.5, 0.9, 0.99, 0.25])
    w = detdiff.min_snr_weight(ab, 5.0)
    assert w.shape == (4, 1, 1, 1)
    assert torch.allclose(w.flatten(), torch.tensor([1.0, 5 / 9, 5 / 99, 1.0]), rtol=1e-6)
    assert detdiff.min_snr_weight(torch.tensor([0.9]), 1.0).item() == pytest.approx(1 / 9, rel=1e-6)


def test_train_step_weights_l_simple_per_sample():
    """With --loss-weight minsnr, L_simple is the mean over samples of w_t x the per-sample squared error."""
    cfg = detdiff.TrainConfig(loss_weight="minsnr", snr_gamma=5.0)
    diff = detdiff.Diffusion(1000)
    t = torch.tensor([10, 900])
    eps, eps_pred = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    got = detdiff.loss_simple(eps_pred, eps, detdiff.timestep_weight(cfg, diff.alpha_bar[t]))
    ab = diff.alpha_bar[t].double()
    snr = ab / (1 - ab)
    w = [min(float(s), 5.0) / float(s) for s in snr]
    assert got.item() == pytest.approx((w[0] * 1.0 + w[1] * 4.0) / 2, rel=1e-5)
    assert detdiff.timestep_weight(detdiff.TrainConfig(loss_weight="none"), diff.alpha_bar[t]) is None
    with pytest.raises(ValueError, match="loss-weight"):
        detdiff.timestep_weight(detdiff.TrainConfig(loss_weight="p2"), diff.alpha_bar[t])


def test_default_train_step_multiplies_foreground_and_min_snr_weights():
    """The default loss weighs every pixel's squared error by GeoDiffusion's foreground weight times Min-SNR-5's
    w_t: train_step's L_simple equals that computed here from the same draws (prompt dropout, t, eps)."""
    import copy
    import data
    import unet
    cfg = detdiff.TrainConfig(timesteps=50, pal_weight=0.0)
    assert cfg.fg_reweight and cfg.loss_weight == "minsnr"                    # the defaults this test is about
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=2)
    torch.manual_seed(0)
    model = unet.UNet(unet.UNetConfig.for_tokenizer(tok, base_channels=8, channel_mults=(1, 2), self_attn_levels=(1,),
                                                     cross_attn_levels=(1,), heads=2, d_model=16, enc_layers=1,
                                                     enc_heads=2, mask_dim=0))
    before = copy.deepcopy(model)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]], [[0.25, 0.5, 1.0, 1.0], [0, 0, 0.5, 0.25]]])
    valid = torch.tensor([[True, False], [True, True]])
    tokens = torch.stack([tok.encode(b[v], torch.tensor([0, 1])[: int(v.sum())]) for b, v in zip(boxes, valid)])
    batch = dict(image=torch.rand(2, 3, 8, 8) * 2 - 1, tokens=tokens, boxes=boxes, valid=valid)
    diff = detdiff.Diffusion(50, cfg.schedule)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    _, l_simple, _ = detdiff.train_step(model, model, copy.deepcopy(model), opt, scaler, diff,
                                        torch.autocast("cpu", enabled=False), batch, tok.null_prompt(), cfg, 0)
    torch.manual_seed(1)                                                       # the same draws, in train_step's order
    torch.rand(2)                                  # attribute-only dropout's draw (the prompts hold only [none])
    drop = torch.rand(2) < cfg.p_uncond
    t = torch.randint(0, 50, (2,))
    eps = torch.randn(2, 3, 8, 8)
    x_t = diff.alpha_bar[t].sqrt().view(2, 1, 1, 1) * batch["image"] + (1 - diff.alpha_bar[t]).sqrt().view(2, 1, 1, 1) * eps
    prompt = torch.where(drop[:, None], tok.null_prompt()[None], tokens)
    err = ((before(x_t, t, prompt) - eps) ** 2).mean(1)                       # (2, 8, 8) per-pixel squared error
    snr = diff.alpha_bar[t] / (1 - diff.alpha_bar[t])
    w_t = torch.minimum(snr, torch.tensor(5.0)) / snr                          # Min-SNR-5 (eps-prediction)
    c = (torch.arange(8) + 0.5) / 8                                            # pixel centres
    fg = torch.ones(2, 8, 8)
    for i in range(2):                                                         # w / area^0.2 inside a box, smaller wins
        for j in torch.argsort(-(boxes[i, :, 2] - boxes[i, :, 0]) * (boxes[i, :, 3] - boxes[i, :, 1])):
            if valid[i, j]:
                x0, y0, x1, y1 = boxes[i, j].tolist()
                area = (x1 - x0) * (y1 - y0)
                inside = ((c[None, :] >= x0) & (c[None, :] < x1) & (c[:, None] >= y0) & (c[:, None] < y1))
                fg[i][inside] = 2.0 / area ** 0.2
        fg[i] /= fg[i].mean()
    expected = (err * fg * w_t.view(2, 1, 1)).mean()
    assert l_simple.item() == pytest.approx(expected.item(), rel=1e-5)
