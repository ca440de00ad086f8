"""The diffusion process of DetDiffusion's generator (docs/paper.md sections 1 and 3): the DDPM
schedule, q_sample, L_simple and its weights, the condition dropout of classifier-free guidance, and
the reverse update rules of the three samplers (DDPM, DDIM, DPM-Solver++ (2M)), which training
(train.py) and sampling (sample.py) both import.

Notation (Ho et al. 2020, "DDPM"; t is an index 0..T-1 everywhere in this project, t = 0 is the least noisy):
    beta_t       variance of the noise added by forward step t                     `betas[t]`
    alpha_t      1 - beta_t                                                          `alphas[t]`
    alpha_bar_t  prod_{s <= t} alpha_s, the signal kept in x_t                       `alpha_bar[t]`
    L_simple     || eps - eps_theta ||^2 (DDPM Eq. 14)                               `loss_simple`
    L_p          sqrt(alpha_bar_t) (L_m + L_d), the perception loss (docs/paper.md Eq. 7)    `perception.perception_loss`
    lambda       L = L_simple + lambda L_p                                           `--pal-weight`
    x_0, x_t     a clean image in [-1, 1] (data.py owns that range) and its noised version; in latent mode
                 x_0 = z = scale * E(image), the frozen autoencoder's unit-variance latent (L_LDM = L_simple on z)
    eps          the standard normal noise that made x_t from x_0                    `eps`
    eps_theta    the UNet's prediction of eps from (x_t, t, layout tokens)           `eps_pred`
    layout tokens  "An image with {(c_i, l_i, d_i)}" as ids (data.LayoutTokenizer)   `tokens`
The schedule and the samplers only call `model(x_t, t, tokens)` (the training loop also asks for the
perception head's mask logits with `return_features=True`); training (train.py) and sampling
(sample.py) share this one schedule and its update rules.

    notebooks/01_ddpm_schedule.ipynb              # the schedule, q_sample and one DDPM / DDIM step by hand
    python -m pytest tests/test_diffusion.py      # every formula here against a closed form or brute force
"""
import math

import torch
import torch.nn as nn

import data


# --------------------------------------------------------------------------------------------------
# Schedule


def make_betas(kind, T):
    """beta_1..beta_T in float64. linear: DDPM's 1e-4..0.02; cosine: Nichol & Dhariwal Eq. (17),
    clipped at 0.999."""
    if kind == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1,
                                    dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)   # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    raise ValueError(f"unknown schedule {kind!r} (linear or cosine)")


def extract(a, t, x):
    """a[t] for a batch t (B,), shaped (B, 1, 1, 1) to broadcast against x; always float32 (outside
    autocast)."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


class Diffusion(nn.Module):
    """The fixed forward process. Buffers are computed in float64 and stored as float32."""

    def __init__(self, T, schedule):
        super().__init__()
        self.T = T
        betas = make_betas(schedule, T)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)                            # alpha_bar_t = prod alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)            # beta~_t, DDPM Eq. (7)
        bufs = dict(betas=betas, alphas=alphas, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                    post_var=post_var,
                    # mu~_t coefficient of x_0
                    post_coef_x0=betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
                    # ... and of x_t
                    post_coef_xt=(1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar))
        for k, v in bufs.items():
            self.register_buffer(k, v.float(), persistent=False)

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: DDPM Eq. (4) / Algorithm 1 line
        5."""
        ab = extract(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def predict_x0(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), Eq. (4) solved for x_0."""
        ab = extract(self.alpha_bar, t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0): DDPM Eq. (6)-(7)."""
        mean = extract(self.post_coef_x0, t, x_t) * x0 + extract(self.post_coef_xt, t, x_t) * x_t
        return mean, extract(self.post_var, t, x_t)


# --------------------------------------------------------------------------------------------------
# Losses and condition dropout


def foreground_weight(boxes, valid, S, w=2.0, p=0.2):
    """GeoDiffusion's foreground re-weighting: pixels inside a box (data.box_pixels) weigh w /
    area^p (the smaller box wins where boxes overlap), background 1; normalised to mean 1 per image.
    boxes (B, M, 4) in [0, 1] -> (B, 1, S, S)."""
    inside = data.box_pixels(boxes, S) & valid[..., None, None]                       # (B, M, S, S)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    wt = torch.where(inside, (w / area ** p)[..., None, None], 1.0)                   # (B, M, S, S)
    wt = (
        wt.amax(1, keepdim=True)
        if boxes.shape[1]
        else torch.ones(boxes.shape[0], 1, S, S, device=boxes.device)
    )
    return wt / wt.mean((2, 3), keepdim=True)


def loss_simple(eps_pred, eps, weight=None):
    """L_simple = E || eps - eps_theta(x_t, t) ||^2: DDPM Eq. (14); optional weight that broadcasts
    against it (per pixel (B, 1, S, S), per sample (B, 1, 1, 1) or both multiplied)."""
    err = (eps - eps_pred.float()) ** 2                                               # (B, C, S, S)
    return (err if weight is None else err * weight).mean()


def min_snr_weight(alpha_bar_t, gamma=5.0):
    """Min-SNR-gamma loss weight for eps-prediction (Hang et al., ICCV 2023, arXiv 2303.09556, Eq.
    11 with eps as the target): w_t = min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 -
    alpha_bar_t). It keeps the noisy steps (SNR <= gamma, w = 1) and turns down the nearly clean
    ones, whose eps is easy to guess and whose gradients fight the others'. alpha_bar_t (B,) -> (B,
    1, 1, 1). Written as min(1, gamma / SNR_t) = min(1, gamma (1 - alpha_bar_t) / alpha_bar_t) in
    float32: alpha_bar_t is a float32 buffer and 1 - alpha_bar_t is exact for alpha_bar_t >= 1/2, so
    float64 would add nothing."""
    ab = alpha_bar_t.float()
    return (gamma * (1 - ab) / ab).clamp(max=1.0).view(-1, 1, 1, 1)


def timestep_weight(cfg, alpha_bar_t):
    """The per-sample weight of L_simple that cfg.loss_weight names: None (uniform, DDPM's L_simple)
    or Min-SNR."""
    if cfg.loss_weight == "none":
        return None
    if cfg.loss_weight == "minsnr":
        return min_snr_weight(alpha_bar_t, cfg.snr_gamma)
    raise ValueError(f"--loss-weight must be none or minsnr, got {cfg.loss_weight!r}")


def drop_condition(tokens, null_tokens, p):
    """Replace each prompt by the null prompt with probability p (classifier-free guidance
    training)."""
    drop = torch.rand(tokens.shape[0], device=tokens.device) < p                           # (B,)
    return torch.where(drop[:, None], null_tokens.to(tokens.device)[None], tokens)


# w_d of the attribute guidance that sample.py, evaluate and the grid stage use by default (the
# attribute study, docs/experiments.md): 1 would be plain classifier-free guidance, under which
# [easy] / [hard] changed nothing measurable.
ATTR_GUIDANCE = 5.0


NONE_ID, EASY_ID, HARD_ID = (data.LayoutTokenizer.SPECIALS.index(s) for s in ("[none]", "[easy]", "[hard]"))


def drop_attributes(tokens, p, generator=None):
    """Attribute-only dropout (beyond the paper): in each prompt with probability p, every object's
    [easy] / [hard] becomes [none] and the rest of the layout stays. It teaches eps(layout, [none]),
    the second condition of the attribute guidance in sample.guided_eps (InstructPix2Pix's
    two-condition guidance, Brooks et al., CVPR 2023). p = 1 gives the prompt's [none] version.
    [easy] / [hard] ids occur only as attribute tokens."""
    # (B,); rand < 1 always
    drop = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) < p
    is_attr = (tokens == EASY_ID) | (tokens == HARD_ID)                                    # (B, L)
    return torch.where(drop[:, None] & is_attr, torch.full_like(tokens, NONE_ID), tokens)


# --------------------------------------------------------------------------------------------------
# One reverse step each (sample.generate runs them with classifier-free guidance)


def x0_and_eps(diff, x_t, t, eps, clip):
    """x_0 predicted from eps (Eq. 4 solved for x_0), clipped to the data range [-1, 1]; eps made
    consistent."""
    x0 = diff.predict_x0(x_t, t, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
        ab = extract(diff.alpha_bar, t, x_t)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return x0, eps


def ddpm_step(diff, x_t, t, eps, noise, clip=True):
    """x_{t-1} = mu~_t(x_0_pred, x_t) + sigma_t z with sigma_t^2 = beta~_t (DDPM Algorithm 2 with
    the posterior variance); no noise at the last step (t = 0)."""
    x0, _ = x0_and_eps(diff, x_t, t, eps, clip)
    mean, var = diff.posterior(x0, x_t, t)                                  # DDPM Eq. (6)-(7)
    nonzero = (t > 0).float().view(-1, *([1] * (x_t.dim() - 1)))
    return mean + nonzero * var.sqrt() * noise


def ddim_step(diff, x_t, t, t_prev, eps, noise, eta=0.0, clip=True):
    """DDIM (Song et al. Eq. 12): x_{t'} = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z,
    with sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab') (Eq. 16). t_prev = -1 means ab' =
    1 (the end)."""
    x0, eps = x0_and_eps(diff, x_t, t, eps, clip)
    ab = extract(diff.alpha_bar, t, x_t)
    ab_prev = torch.where(t_prev >= 0, diff.alpha_bar.to(x_t.device)[t_prev.clamp(min=0)],
                          1.0).view_as(ab)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise


def log_snr(diff, t, x):
    """lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 -
    alpha_bar_t) (DPM-Solver's half log-SNR), shaped to broadcast against x, in float32 (as
    alpha_bar_t is stored)."""
    return half_log_snr(extract(diff.alpha_bar, t, x))


def half_log_snr(ab):
    """0.5 (log alpha_bar - log(1 - alpha_bar)) in ab's dtype."""
    return 0.5 * (ab.log() - (1 - ab).log())


def dpm2m_step(diff, x_t, t, t_prev, x0, x0_last=None, h_last=None):
    """One step of DPM-Solver++ (2M) (Lu et al. 2022, Algorithm 2), the data-prediction multistep
    ODE solver that GeoDiffusion samples COCO with. With h = lambda_{t'} - lambda_t and D the x_0
    estimate:
        x_{t'} = (sigma_{t'} / sigma_t) x_t - alpha_{t'} (e^{-h} - 1) D,
        D = x0                                          on the first step (this is exactly DDIM with eta = 0),
        D = (1 + 1/(2r)) x0 - 1/(2r) x0_last, r = h_last / h   after it (the 2nd-order multistep correction).
    t_prev, an int (every sample of the batch is at the same step), = -1 is the end (alpha = 1,
    sigma = 0): the last step returns the x_0 estimate itself (first order). Returns (x_{t'}, h) so
    that the caller can pass h on as h_last. Computed in float32: the device may have no float64
    (MPS), and over a 20-step solve of a Gaussian problem float32 stays within 1e-5 of a float64
    solver (tests/test_devices.py)."""
    if t_prev < 0:
        return x0, None
    t_prev = torch.full_like(t, t_prev)
    lam, lam_prev = log_snr(diff, t, x_t), log_snr(diff, t_prev, x_t)
    ab, ab_prev = extract(diff.alpha_bar, t, x_t), extract(diff.alpha_bar, t_prev, x_t)
    h = lam_prev - lam
    D = x0.float()
    if x0_last is not None:
        r = h_last / h
        D = (1 + 1 / (2 * r)) * D - 1 / (2 * r) * x0_last.float()
    x = ((1 - ab_prev) / (1 - ab)).sqrt() * x_t.float() - ab_prev.sqrt() * torch.expm1(-h) * D
    return x.to(x_t.dtype), h


# The lowest log-SNR a DPM-Solver++ grid starts from: DDPM's linear schedule's at t = T-1 with T =
# 1000 (about -5.06, alpha_bar 4e-5). The cosine schedule's betas are clipped at 0.999, so its last
# timesteps fall to lambda -9.9 (alpha_bar 2e-9): a grid uniform down to there spends its first
# steps where x_t is noise and nothing changes (DPM-Solver stops the cosine schedule at t = 0.9946
# for the same reason). Sampling starts from N(0, I) at the grid's first timestep.
LAMBDA_MIN = float(half_log_snr(torch.cumprod(1 - make_betas("linear", 1000), 0)[-1]))


def logsnr_grid(diff, steps):
    """DPM-Solver's timestep grid for low-resolution pixel models: exactly `steps` timesteps from
    lambda_min = max(lambda_{T-1}, LAMBDA_MIN) up to lambda_0, uniform in lambda_t, each rounded to
    the nearest of the T discrete timesteps; where two round to one timestep (the schedule's ends,
    where lambda moves fast in t) they are pushed apart to free timesteps (down from the start, up
    from t = 0), so every step is a model call; the last is t = 0 when steps >= 2. On the Gaussian test problem of tests/test_diffusion.py this grid converges at
    second order where the DDIM grid (uniform in t) does not: its last steps are too long in
    lambda."""
    if not 1 <= steps <= diff.T:
        raise ValueError(f"steps must be between 1 and T = {diff.T}, got {steps}")
    lam = half_log_snr(diff.alpha_bar.detach().cpu().double())           # increasing as t decreases
    lo = max(float(lam[-1]), LAMBDA_MIN)
    want = torch.linspace(lo, float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - want[:, None]).abs().argmin(1).tolist()             # decreasing in t
    for i in range(1, steps):                       # strictly decreasing: a repeat takes the next t
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(steps - 1, -1, -1):              # ... and none below 0
        ts[i] = max(ts[i], steps - 1 - i)
    return ts
