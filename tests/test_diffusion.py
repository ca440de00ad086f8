"""diffusion.py: the schedule, forward process, posterior, the losses and the samplers' update rules
against brute-force / closed-form references (DPM-Solver++ (2M) on a Gaussian whose probability-flow
ODE is solved exactly)."""
import math

import pytest
import torch

import data
import diffusion
import sample
import train


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_monotone_and_brute_force_product(kind):
    d = diffusion.Diffusion(1000, kind)
    betas = diffusion.make_betas(kind, 1000).tolist()
    prod, ref = 1.0, []
    for b in betas:                  # alpha_bar_t = prod_{s <= t} (1 - beta_s), a plain python loop
        prod *= 1.0 - b
        ref.append(prod)
    assert torch.allclose(d.alpha_bar.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5,
                          atol=1e-9)
    assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all() and 0 < d.alpha_bar[-1] < d.alpha_bar[0] < 1
    assert d.alpha_bar.dtype == torch.float32


def test_linear_betas_are_ddpm_values():
    b = diffusion.make_betas("linear", 1000)
    assert (
        b.dtype == torch.float64
        and b[0].item() == pytest.approx(1e-4)
        and b[-1].item() == pytest.approx(0.02)
    )


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_matches_step_by_step_forward_process(t):
    torch.manual_seed(0)
    d = diffusion.Diffusion(1000, "linear")
    n = 16000
    x0 = torch.linspace(-1, 1, 4).repeat(n, 1)                    # (n, 4): 4 different pixel values
    x = x0.double().clone()
    for s in range(t + 1):    # q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s), DDPM Eq. (2)
        b = d.betas[s].double()
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn_like(x)
    closed = d.q_sample(x0, torch.full((n,), t), torch.randn_like(x0))
    for samples in (x, closed):
        ab = math.prod(1 - float(b) for b in diffusion.make_betas("linear", 1000)[: t + 1])
        assert torch.allclose(samples.mean(0).float(), math.sqrt(ab) * x0[0], atol=0.03)
        assert torch.allclose(samples.var(0).float(), torch.full((4,), 1 - ab), rtol=0.05,
                              atol=2e-5)


@pytest.mark.parametrize("t", [1, 5, 100, 999])
def test_posterior_mean_and_variance_match_gaussian_bayes(t):
    d = diffusion.Diffusion(1000, "cosine")
    betas = diffusion.make_betas("cosine", 1000)
    ab_prev, beta = torch.prod(1 - betas[:t]), betas[t]                     # float64 brute force
    x0, x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(
        3, 2, 4, 4, dtype=torch.float64
    )
    # q(x_{t-1} | x_0) q(x_t | x_{t-1}) as a product of Gaussians in x_{t-1}
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean_ref = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta) / prec
    mean, var = d.posterior(x0.float(), x_t.float(), torch.full((3,), t))
    assert torch.allclose(mean.double(), mean_ref, atol=1e-4)
    assert torch.allclose(var.double().flatten(), (1 / prec).expand(3), rtol=1e-4)


def test_posterior_at_t0_is_x0():
    d = diffusion.Diffusion(100, "linear")
    x0, x_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mean, var = d.posterior(x0, x_t, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t", [1, 37, 500, 999])
def test_ddim_eta1_single_step_equals_ddpm_step(t, clip):
    d = diffusion.Diffusion(1000, "linear")
    g = torch.Generator().manual_seed(t)
    x_t, eps, z = (torch.randn(2, 3, 8, 8, generator=g) * 1.5 for _ in range(3))
    tt = torch.full((2,), t)
    a = diffusion.ddpm_step(d, x_t, tt, eps, z, clip)
    b = diffusion.ddim_step(d, x_t, tt, tt - 1, eps, z, eta=1.0, clip=clip)
    assert torch.allclose(a, b, atol=1e-3)   # float32; 1 - alpha_bar_1 ~ 3e-4 amplifies rounding at
                                             # t = 1


def test_last_step_adds_no_noise():
    d = diffusion.Diffusion(100, "linear")
    x_t, eps, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    x0 = d.predict_x0(x_t, t, eps).clamp(-1, 1)
    assert torch.allclose(diffusion.ddpm_step(d, x_t, t, eps, z),
                          diffusion.ddpm_step(d, x_t, t, eps, 0 * z))
    assert torch.allclose(diffusion.ddim_step(d, x_t, t, t - 1, eps, z, eta=1.0), x0, atol=1e-5)


def test_loss_simple_hand_value_and_weight():
    eps, pred = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    assert diffusion.loss_simple(pred, eps).item() == pytest.approx((1 + 4 + 0 + 1) / 4)
    w = torch.tensor([[[[2.0, 0.0], [1.0, 1.0]]]])
    assert diffusion.loss_simple(pred, eps, w).item() == pytest.approx((2 + 0 + 0 + 1) / 4)


def test_foreground_weight_hand_values():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]]])   # one quarter-image box + padding
    valid = torch.tensor([[True, False]])
    w = diffusion.foreground_weight(boxes, valid, 4)                          # (1, 1, 4, 4)
    fg = 2 / 0.25 ** 0.2                                                    # w / area^p
    ref = torch.ones(4, 4)
    ref[:2, :2] = fg
    ref = ref / ref.mean()
    assert torch.allclose(w[0, 0], ref, atol=1e-5) and w.mean().item() == pytest.approx(1.0)


def test_drop_condition_rate_and_content():
    torch.manual_seed(0)
    tokens, null = torch.arange(12).repeat(20000, 1) + 100, torch.arange(12)
    out = diffusion.drop_condition(tokens, null, 0.1)
    dropped = (out == null).all(1)
    assert ((out == tokens).all(1) | dropped).all()
    assert 0.09 < dropped.float().mean().item() < 0.11
    assert (diffusion.drop_condition(tokens[:50], null, 0.0) == tokens[:50]).all()


def test_drop_attributes_replaces_only_the_attribute_tokens():
    tok = data.LayoutTokenizer(["a", "b", "c"], bins=8, max_objects=3)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    # [easy], [hard]
    tokens = torch.stack([tok.encode(boxes, torch.tensor([0, 2]), torch.tensor([1, 2]))] * 20000)
    plain = tok.encode(boxes, torch.tensor([0, 2]), torch.tensor([0, 0]))              # both [none]
    assert torch.equal(diffusion.drop_attributes(tokens[:3], 1.0), plain.expand(3, -1))
    assert torch.equal(diffusion.drop_attributes(tokens[:3], 0.0), tokens[:3])
    out = diffusion.drop_attributes(tokens, 0.3, torch.Generator().manual_seed(0))
    dropped = (out == plain).all(1)
    assert ((out == tokens).all(1) | dropped).all()  # all of a prompt's attributes, or none of them
    assert 0.29 < dropped.float().mean().item() < 0.31
    # the layout itself is untouched
    assert tok.decode(out[dropped][0])["labels"].tolist() == [0, 2]


def test_extract_broadcasts_float32():
    a = torch.arange(10, dtype=torch.float32)
    out = diffusion.extract(a, torch.tensor([3, 7]), torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16))
    assert out.shape == (2, 1, 1,
                         1) and out.dtype == torch.float32 and out.flatten().tolist() == [3.0, 7.0]


def test_min_snr_weight_by_hand():
    """w_t = min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t): SNR 1 -> 1, 9 ->
    5/9, 99 -> 5/99, 1/3 -> 1 (gamma 5); gamma 1 at SNR 9 -> 1/9."""
    ab = torch.tensor([0.5, 0.9, 0.99, 0.25])
    w = diffusion.min_snr_weight(ab, 5.0)
    assert w.shape == (4, 1, 1, 1)
    assert torch.allclose(w.flatten(), torch.tensor([1.0, 5 / 9, 5 / 99, 1.0]), rtol=1e-6)
    assert diffusion.min_snr_weight(torch.tensor([0.9]), 1.0).item() == pytest.approx(
        1 / 9, rel=1e-6
    )


def test_train_step_weights_l_simple_per_sample():
    """With --loss-weight minsnr, L_simple is the mean over samples of w_t x the per-sample squared
    error."""
    cfg = train.TrainConfig(loss_weight="minsnr", snr_gamma=5.0)
    diff = diffusion.Diffusion(1000, "linear")
    t = torch.tensor([10, 900])
    eps, eps_pred = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4) * torch.tensor([1.0, 2.0]).view(
        2, 1, 1, 1
    )
    got = diffusion.loss_simple(eps_pred, eps, diffusion.timestep_weight(cfg, diff.alpha_bar[t]))
    ab = diff.alpha_bar[t].double()
    snr = ab / (1 - ab)
    w = [min(float(s), 5.0) / float(s) for s in snr]
    assert got.item() == pytest.approx((w[0] * 1.0 + w[1] * 4.0) / 2, rel=1e-5)
    assert diffusion.timestep_weight(train.TrainConfig(loss_weight="none"),
                                     diff.alpha_bar[t]) is None
    with pytest.raises(ValueError, match="loss-weight"):
        diffusion.timestep_weight(train.TrainConfig(loss_weight="p2"), diff.alpha_bar[t])


# ---- DPM-Solver++ (2M)
# ----------------------------------------------------------------------------------------


class GaussianEps(torch.nn.Module):
    """The exact eps for data x_0 ~ N(0, s^2 I): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 -
    ab). Its probability-flow ODE has a closed-form solution: x_t / sqrt(ab_t s^2 + 1 - ab_t) stays
    constant."""
    def __init__(self, diff, s=0.5):
        super().__init__()
        self.diff, self.s, self.cfg = diff, s, type("Cfg", (), {"in_channels": 1})()

    def forward(self, x, t, tokens):
        ab = diffusion.extract(self.diff.alpha_bar, t, x)
        return (1 - ab).sqrt() * x / (ab * self.s ** 2 + 1 - ab)


def ode_solution(diff, x_T, s):
    ab = diff.alpha_bar[-1].double()
    return s * x_T.double() / (ab * s ** 2 + 1 - ab).sqrt()


def test_dpm2m_first_step_is_ddim():
    diff, g = diffusion.Diffusion(1000, "linear"), torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g).clamp(-1, 1)
    t, t_prev = torch.tensor([900, 900]), torch.tensor([700, 700])
    eps = (x - diff.alpha_bar[900].sqrt() * x0) / (1 - diff.alpha_bar[900]).sqrt()
    dpm, _ = diffusion.dpm2m_step(diff, x, t, 700, x0)
    ddim = diffusion.ddim_step(diff, x, t, t_prev, eps, torch.zeros_like(x), eta=0.0, clip=False)
    assert torch.allclose(dpm, ddim, atol=1e-5)


def test_dpm2m_second_order_step_against_hand_computed_values():
    diff = diffusion.Diffusion(1000, "linear")
    ab = {t: float(diff.alpha_bar[t]) for t in (900, 800, 700)}
    lam = {t: 0.5 * math.log(ab[t] / (1 - ab[t])) for t in ab}       # lambda = log(alpha / sigma)
    x, x0, x0_last = 0.7, 0.3, -0.2                                  # scalars, by hand
    h_last, h = lam[800] - lam[900], lam[700] - lam[800]
    r = h_last / h
    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
    want = (
        math.sqrt(1 - ab[700]) / math.sqrt(1 - ab[800]) * x
        - math.sqrt(ab[700]) * (math.exp(-h) - 1) * D
    )
    got, h_got = diffusion.dpm2m_step(diff, torch.full((1, 1, 1, 1), x), torch.tensor([800]), 700,
                                      torch.full((1, 1, 1, 1), x0),
                                      torch.full((1, 1, 1, 1), x0_last),
                                      torch.full((1, 1, 1, 1), h_last, dtype=torch.float64))
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(h_got) == pytest.approx(h, rel=1e-5)


def test_dpm2m_converges_to_the_ode_solution_and_to_ddim():
    diff = diffusion.Diffusion(1000, "linear")
    model, tokens, null = (
        GaussianEps(diff),
        torch.zeros(4, 1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )

    def run(sampler, steps):
        x = sample.generate(model, diff, tokens, null, 4, steps, sampler, guidance=1.0,
                            generator=torch.Generator().manual_seed(0), clip=False, progress=False)
        return x.double()

    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = ode_solution(diff, x_T, model.s)
    err = {n: (run("dpm++2m", n) - exact).abs().max().item() for n in (10, 20, 40, 100)}
    assert err[10] > err[20] > err[40] > err[100] and err[100] < 2e-3
    assert err[40] / err[100] > 4                 # about second order: 2.5x the steps, > 4x smaller
    # and well ahead of DDIM (first order)
    assert err[20] < 0.25 * (run("ddim", 20) - exact).abs().max().item()
    ddim_fine = run("ddim", 1000)
    gap = [(run("dpm++2m", n) - ddim_fine).abs().max().item() for n in (10, 40, 100)]
    assert gap[0] > gap[1] > gap[2]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_logsnr_grid_takes_exactly_the_steps_asked_and_none_where_x_t_is_noise(schedule):
    """Rounding lambda to the nearest timestep used to merge steps at the schedule's ends: asking the
    cosine schedule for 15 gave 13 timesteps, three of them at alpha_bar <= 1e-5 (t = 999, 998, 997)."""
    diff = diffusion.Diffusion(1000, schedule)
    for n in (2, 5, 15, 20, 50, 200, 1000):
        ts = diffusion.logsnr_grid(diff, n)
        assert len(ts) == n and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:])) and ts[0] <= 999
    ts = diffusion.logsnr_grid(diff, 15)
    assert float(diff.alpha_bar[ts[0]]) > 1e-5 and float(diff.alpha_bar[ts[1]]) > 1e-5
    # the first step from lambda_min is as long in lambda as the others (up to rounding t)
    lam = 0.5 * (diff.alpha_bar.double().log() - (1 - diff.alpha_bar.double()).log())
    h = [float(lam[b] - lam[a]) for a, b in zip(ts, ts[1:])]
    assert h[0] < 1.5 * (sum(h) / len(h))
    assert abs(float(lam[ts[0]]) - max(float(lam[-1]), diffusion.LAMBDA_MIN)) < 0.05
    with pytest.raises(ValueError, match="steps must be between 1 and T = 1000"):
        diffusion.logsnr_grid(diff, 0)


def test_logsnr_grid_is_uniform_in_lambda():
    diff = diffusion.Diffusion(1000, "linear")
    ts = diffusion.logsnr_grid(diff, 10)
    assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    lam = [0.5 * math.log(float(diff.alpha_bar[t]) / (1 - float(diff.alpha_bar[t]))) for t in ts]
    steps = [b - a for a, b in zip(lam, lam[1:])]
    # equal in lambda up to rounding t
    assert max(steps) - min(steps) < 0.15 * (sum(steps) / len(steps))
