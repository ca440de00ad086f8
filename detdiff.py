"""DetDiffusion's generator and the main job: the DDPM schedule, its losses, the training loop (PAPER.md sections
1 and 3) and the pipeline data -> detector -> attributes -> (autoencoder) -> generator -> grid.

    python detdiff.py                                   # the main job on `shapes` into runs/shapes (~13 min, CPU)
    python detdiff.py --stage generator --steps 200 --out runs/quick   # one stage; --help lists every setting
    python detdiff.py --out runs/shapes --resume        # continue a killed run from its last checkpoint
    python detdiff.py --paper                           # the paper's lambda 0.01, token conditioning, plain
                                                        # L_simple, linear schedule, no attribute guidance
                                                        # (PAPER_SETTINGS; the defaults differ where issues 13
                                                        # and 14's studies measured better ones)
    python detdiff.py --evaluate                        # the main job, then evaluate.py's report on the run
    python detdiff.py --space latent --image-size 64    # latent mode: an autoencoder stage, the UNet on its latents
    python detdiff.py --data DIR --detector torchvision:fasterrcnn_resnet50_fpn --detector-weights FILE
                                                        # the user's perceptive model for the attribute and the
                                                        # fidelity metric (also a detdiff .pt or a COCO results json)
    torchrun --nproc_per_node=2 detdiff.py --stage generator ...   # DDP (gloo on CPU, nccl on CUDA)

Notation (Ho et al. 2020, "DDPM"; t is an index 0..T-1 everywhere in this project, t = 0 is the least noisy):
    beta_t       variance of the noise added by forward step t                     `betas[t]`
    alpha_t      1 - beta_t                                                          `alphas[t]`
    alpha_bar_t  prod_{s <= t} alpha_s, the signal kept in x_t                       `alpha_bar[t]`
    L_simple     || eps - eps_theta ||^2 (DDPM Eq. 14)                               `loss_simple`
    L_p          sqrt(alpha_bar_t) (L_m + L_d), the perception loss (PAPER.md s.3)    `perception.perception_loss`
    lambda       L = L_simple + lambda L_p                                           `--pal-weight`
    x_0, x_t     a clean image in [-1, 1] (data.py owns that range) and its noised version; in latent mode
                 x_0 = z = scale * E(image), the frozen autoencoder's unit-variance latent (L_LDM = L_simple on z)
    eps          the standard normal noise that made x_t from x_0                    `eps`
    eps_theta    the UNet's prediction of eps from (x_t, t, layout tokens)           `eps_pred`
    layout tokens  "An image with {(c_i, l_i, d_i)}" as ids (data.LayoutTokenizer)   `tokens`
The schedule and the samplers only call `model(x_t, t, tokens)` (the training loop also asks for the perception
head's mask logits with `return_features=True`); sample.py reuses `Diffusion` (no second schedule).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import perception
from unet import Autoencoder, AutoencoderConfig, UNet, UNetConfig


# ----------------------------------------------------------------------------------------------------------------
# Schedule

def make_betas(kind, T):
    """beta_1..beta_T in float64. linear: DDPM's 1e-4..0.02; cosine: Nichol & Dhariwal Eq. (17), clipped at 0.999."""
    if kind == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)   # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    raise ValueError(f"unknown schedule {kind!r} (linear or cosine)")


def extract(a, t, x):
    """a[t] for a batch t (B,), shaped (B, 1, 1, 1) to broadcast against x; always float32 (outside autocast)."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


class Diffusion(nn.Module):
    """The fixed forward process. Buffers are computed in float64 and stored as float32."""

    def __init__(self, T=1000, schedule="linear"):
        super().__init__()
        self.T = T
        betas = make_betas(schedule, T)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)                                       # alpha_bar_t = prod alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)                  # beta~_t, DDPM Eq. (7)
        bufs = dict(betas=betas, alphas=alphas, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                    post_var=post_var,
                    post_coef_x0=betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),   # mu~_t coefficient of x_0
                    post_coef_xt=(1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar))  # ... and of x_t
        for k, v in bufs.items():
            self.register_buffer(k, v.float(), persistent=False)

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: DDPM Eq. (4) / Algorithm 1 line 5."""
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


# ----------------------------------------------------------------------------------------------------------------
# Losses and condition dropout

def foreground_weight(boxes, valid, S, w=2.0, p=0.2):
    """GeoDiffusion's foreground re-weighting: pixels inside a box weigh w / area^p (the smaller box wins
    where boxes overlap), background 1; normalised to mean 1 per image. boxes (B, M, 4) in [0, 1] -> (B, 1, S, S)."""
    c = (torch.arange(S, device=boxes.device) + 0.5) / S
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))                        # (B, M, 1, 1)
    inside = (c[None, None, None, :] >= x0) & (c[None, None, None, :] < x1) & \
             (c[None, None, :, None] >= y0) & (c[None, None, :, None] < y1) & valid[..., None, None]  # (B, M, S, S)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    wt = torch.where(inside, (w / area ** p)[..., None, None], torch.ones(()))            # (B, M, S, S)
    wt = wt.amax(1, keepdim=True) if boxes.shape[1] else torch.ones(boxes.shape[0], 1, S, S)
    return wt / wt.mean((2, 3), keepdim=True)


def loss_simple(eps_pred, eps, weight=None):
    """L_simple = E || eps - eps_theta(x_t, t) ||^2: DDPM Eq. (14); optional weight that broadcasts against it
    (per pixel (B, 1, S, S), per sample (B, 1, 1, 1) or both multiplied)."""
    err = (eps - eps_pred.float()) ** 2                                                    # (B, C, S, S)
    return (err if weight is None else err * weight).mean()


def min_snr_weight(alpha_bar_t, gamma=5.0):
    """Min-SNR-gamma loss weight for eps-prediction (Hang et al., ICCV 2023, arXiv 2303.09556, Eq. 11 with
    eps as the target): w_t = min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t). It keeps the
    noisy steps (SNR <= gamma, w = 1) and turns down the nearly clean ones, whose eps is easy to guess and whose
    gradients fight the others'. alpha_bar_t (B,) -> (B, 1, 1, 1)."""
    snr = alpha_bar_t.double() / (1 - alpha_bar_t.double())
    return (snr.clamp(max=gamma) / snr).float().view(-1, 1, 1, 1)


def timestep_weight(cfg, alpha_bar_t):
    """The per-sample weight of L_simple that cfg.loss_weight names: None (uniform, DDPM's L_simple) or Min-SNR."""
    if cfg.loss_weight == "none":
        return None
    if cfg.loss_weight == "minsnr":
        return min_snr_weight(alpha_bar_t, cfg.snr_gamma)
    raise ValueError(f"--loss-weight must be none or minsnr, got {cfg.loss_weight!r}")


def drop_condition(tokens, null_tokens, p):
    """Replace each prompt by the null prompt with probability p (classifier-free guidance training)."""
    drop = torch.rand(tokens.shape[0], device=tokens.device) < p                           # (B,)
    return torch.where(drop[:, None], null_tokens.to(tokens.device)[None], tokens)


# w_d of the attribute guidance that sample.py, evaluate.py and the grid stage use by default (issue 14's study,
# README "Difficulty that shows"): 1 would be plain classifier-free guidance, under which [easy] / [hard] changed
# nothing measurable.
ATTR_GUIDANCE = 5.0
NONE_ID, EASY_ID, HARD_ID = (data.LayoutTokenizer.SPECIALS.index(s) for s in ("[none]", "[easy]", "[hard]"))


def drop_attributes(tokens, p, generator=None):
    """Attribute-only dropout (beyond the paper): in each prompt with probability p, every object's [easy] / [hard]
    becomes [none] and the rest of the layout stays. It teaches eps(layout, [none]), the second condition of the
    attribute guidance in sample.guided_eps (InstructPix2Pix's two-condition guidance, Brooks et al., CVPR 2023).
    p = 1 gives the prompt's [none] version. [easy] / [hard] ids occur only as attribute tokens."""
    drop = torch.rand(tokens.shape[0], device=tokens.device, generator=generator) < p      # (B,); rand < 1 always
    is_attr = (tokens == EASY_ID) | (tokens == HARD_ID)                                    # (B, L)
    return torch.where(drop[:, None] & is_attr, torch.full_like(tokens, NONE_ID), tokens)


# ----------------------------------------------------------------------------------------------------------------
# Run settings (every field is a command-line flag; --help lists them)

@dataclass
class TrainConfig:
    data: str = "shapes"             # data.resolve_data name or a COCO-format folder
    out: str = ""                    # run folder; default runs/<data name>
    resume: bool = False
    steps: int = 0                   # optimizer-step cap (0 = none: the time budget alone decides)
    minutes: float = 11.0            # wall-clock budget (0 = none, then --steps is the run's length): stop at
                                     # whichever comes first, the lr schedule follows the further along; --minutes 0
                                     # --steps N makes a run exactly reproducible
    batch_size: int = 32             # per process
    lr: float = 2e-3                 # issue 13's study: 2e-3 beat 1e-3 and 4e-3 at the 9-minute budget
    warmup: int = 100
    min_lr_frac: float = 0.1         # cosine decay to lr * min_lr_frac
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    dtype: str = "auto"              # auto | fp32 | bf16 | fp16 (GradScaler only for fp16). auto: bf16 autocast where
                                     # the hardware has bf16 (a CUDA GPU that supports it, a CPU with AVX-512 BF16 or
                                     # AMX), else fp32; bf16 without it is many times slower (emulated)
    compile: bool = False
    seed: int = 0
    timesteps: int = 1000
    schedule: str = "cosine"         # cosine (Nichol & Dhariwal; the default, measured) | linear (DDPM's, the paper's)
    p_uncond: float = 0.1            # GeoDiffusion: 10% of prompts become the null prompt
    p_uncond_attr: float = 0.2       # attribute-only dropout: this fraction of prompts get [none] for every object's
                                     # attribute (beyond the paper; trains sample.py's --attr-guidance; issue 14)
    fg_reweight: bool = True         # GeoDiffusion's foreground re-weighting of L_simple (issue 13's study: on;
                                     # --no-fg-reweight is the paper's plain L_simple)
    loss_weight: str = "minsnr"      # weight of L_simple over timesteps: minsnr (Min-SNR-gamma, the default,
                                     # measured) | none (DDPM's L_simple, the paper's)
    snr_gamma: float = 5.0           # Min-SNR's gamma (Hang et al.: 5)
    pal_weight: float = 0.1          # lambda of L = L_simple + lambda L_p (PAPER.md s.3); paper 0.01; 0 = no head
    attributes: str = "auto"         # auto: the run's attributes.json (pipeline stage) | none: [none] tokens | a path
    image_size: int = 32
    space: str = "pixel"             # pixel | latent: the UNet learns the frozen autoencoder's scaled latents
                                     # (the paper's L_LDM; how to scale to 64 px and up)
    autoencoder: str = "auto"        # latent: auto = the run's autoencoder.pt (the autoencoder stage) | a path
    ae_steps: int = 1000             # autoencoder stage: optimizer steps (batch_size images each, lr, warmup)
    ae_factor: int = 4               # autoencoder: downsampling factor (64 px -> 16 x 16 latents)
    ae_channels: int = 16
    ae_latent_channels: int = 4
    ae_edge_weight: float = 0.0      # autoencoder loss: L1 + this x L1 of the image gradients (an optional edge
                                     # term; no downloaded perceptual network)
    bins: int = 32
    location: str = "grid"           # grid | axis (data.LayoutTokenizer)
    max_objects: int = 8
    min_area: float = 0.02
    log_every: int = 25
    sample_every: int = 250          # periodic sample grid (0 = only at the end)
    ckpt_every: int = 250            # periodic checkpoint (always one at the end)
    sample_steps: int = 25           # DDIM steps of the periodic grid
    guidance: float = 3.0            # classifier-free guidance scale of the periodic grid
    attr_guidance: float = -1.0      # w_d of the grid stage's attribute guidance (sample.guided_eps; 1 = none);
                                     # -1: ATTR_GUIDANCE when the run trained with --p-uncond-attr, else 1
    n_grid: int = 8                  # validation layouts in the grid
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    # the main job's other stages (python detdiff.py runs them all; perception.py has them as commands too)
    stage: str = "all"               # all | data | detector | attributes | autoencoder | generator | grid
    detector: str = ""               # the perceptive model (attribute and fidelity metric) from the user instead of
                                     # training one: a detdiff detector .pt, a COCO results .json made on the data
                                     # set's own images (attribute only), or torchvision:NAME (e.g. torchvision:
                                     # fasterrcnn_resnet50_fpn) with --detector-weights FILE; nothing is downloaded
    detector_weights: str = ""       # local weights file of a torchvision:NAME detector
    detector_classes: str = ""       # data-set class=detector class,... where names differ (every class must map)
    det_steps: int = 1000            # detector (perception metric) optimizer steps, trained from scratch
    det_size: int = 64               # detector input side
    attr_steps: int = 400            # steps of each held-out fold's detector (perception-aware attribute)
    attr_folds: int = 2
    gamma: float = 0.4               # attribute: confidence threshold (our choice; the paper's is unknown)
    beta: float = 0.5                # attribute: IoU threshold
    class_aware: bool = False        # attribute: a prediction must also have the object's class
    n_eval: int = 100                # val layouts generated for the grid stage's quick layout-fidelity check
    evaluate: bool = False           # then run evaluate.py on the run folder: report.md, metrics.json (see its
                                     # docstring; about 25 min on shapes)


RESUME_OVERRIDES = {"steps", "minutes", "log_every", "sample_every", "ckpt_every", "out", "resume", "device", "stage",
                    "n_eval", "evaluate", "attr_guidance"}
TOKENIZER_FIELDS = {"vocab_size", "seq_len", "tokens_per_object", "max_objects", "pad_id", "class_offset",
                    "loc_offset", "bins", "location"}


def model_fields():
    return [f for f in fields(UNetConfig) if f.name not in TOKENIZER_FIELDS]


# The paper's own settings where the defaults (issue 13's study, README) differ from them; `--paper` sets them all,
# and any flag given beside it still wins. The schedule is DDPM's linear one (the paper's Stable Diffusion uses a
# scaled-linear variant of it).
PAPER_SETTINGS = dict(cond="tokens", pal_weight=0.01, loss_weight="none", fg_reweight=False, schedule="linear",
                      p_uncond_attr=0.0)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--paper", action="store_true", default=argparse.SUPPRESS,
                    help="the paper's settings: " + " ".join(f"{k}={v}" for k, v in PAPER_SETTINGS.items()))
    for group, flds in (("run", fields(TrainConfig)), ("model (UNetConfig)", model_fields())):
        g = ap.add_argument_group(group)
        for f in flds:
            flag = "--" + f.name.replace("_", "-")
            if f.type in (bool, "bool"):
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"default {f.default}")
            elif f.type in (tuple, "tuple"):
                g.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",") if v), metavar="A,B,..",
                               default=argparse.SUPPRESS, help=f"default {','.join(map(str, f.default))}")
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                g.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=f"default {f.default}")
    return ap


def parse_flags(argv=None):
    """The command line as a flat dict of the flags given; --paper puts PAPER_SETTINGS under them."""
    given = vars(build_parser().parse_args(argv))
    return {**PAPER_SETTINGS, **given} if given.pop("paper", False) else given


def split_args(given):
    """Flat dict of flags -> (TrainConfig kwargs, UNetConfig kwargs); an unknown key is an error."""
    tnames, mnames = {f.name for f in fields(TrainConfig)}, {f.name for f in model_fields()}
    unknown = set(given) - tnames - mnames
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return {k: v for k, v in given.items() if k in tnames}, {k: v for k, v in given.items() if k in mnames}


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the loop

def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags as the kernel lists them (Linux); an empty set where there is no such file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


def resolve_dtype(dtype, device, flags=None):
    """--dtype auto -> (dtype, why): bf16 autocast where the hardware computes in bf16 (a CUDA device that
    supports it; an x86 CPU with AVX-512 BF16 or AMX, read from /proc/cpuinfo), else fp32, because a CPU without
    bf16 instructions emulates them and runs many times slower than in fp32. Other values pass through."""
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    if dtype != "auto":
        return dtype, "as asked"
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16", "auto: the GPU supports bf16") if ok else ("fp32", "auto: the GPU has no bf16")
    if device.type == "cpu":
        have = sorted({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else set(flags)))
        if have:
            return "bf16", f"auto: the CPU has {' and '.join(have)}"
        return "fp32", "auto: no native bf16 on this CPU (no avx512_bf16 / amx_bf16), fp32 is faster"
    return "fp32", f"auto: fp32 on {device.type}"


def lr_at(cfg, step, progress):
    """Linear warm-up for `warmup` steps, then cosine decay from lr to lr * min_lr_frac as progress goes 0 -> 1."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    c = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * c)


def batch_indices(n, batch, step, seed, rank=0, world=1):
    """The dataset indices of `step`'s batch on `rank`: a pure function of (seed, step), so a resumed run sees
    exactly the batches the killed run would have seen. Epochs are seeded permutations of 0..n-1."""
    G = batch * world
    first = step * G
    out = []
    for i in range(first + rank * batch, first + (rank + 1) * batch):
        epoch, k = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[k]))
    return out


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path):
    tmp = str(path) + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)   # readers see the old or the new file, never half of one


def tokenizer_from(meta):
    return data.LayoutTokenizer(meta["class_names"], bins=meta["bins"], max_objects=meta["max_objects"],
                                location=meta["location"])


def attributes_path(cfg, out):
    """The attribute sidecar a generator run reads: None for "none"; for "auto" the run folder's attributes.json
    when the attributes stage wrote one; otherwise the given path, which must exist."""
    if cfg.attributes == "none":
        return None
    if cfg.attributes == "auto":
        p = Path(out) / "attributes.json"
        return p.resolve() if p.is_file() else None
    if not Path(cfg.attributes).is_file():
        raise SystemExit(f"error: {cfg.attributes}: attribute sidecar not found (--attributes auto|none|PATH)")
    return Path(cfg.attributes).resolve()


def loss_curve(curves, path, title="training loss", smooth=0.95):
    """A PNG of one or more loss curves {name: (steps, values)} against step, log-y: the raw values light, an
    exponential moving average dark, one colour per curve (PIL only; matplotlib is not a runtime dependency)."""
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 720, 400, 60, 150, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((L, 8), title, fill="black")
    curves = {k: (np.asarray(s, np.float64), np.log10(np.clip(np.asarray(v, np.float64), 1e-6, None)))
              for k, (s, v) in curves.items() if len(s) >= 2}
    if curves:
        lo = min(v.min() for _, v in curves.values())
        hi = max(v.max() for _, v in curves.values()) + 1e-9
        s0 = min(s[0] for s, _ in curves.values())
        s1 = max(s[-1] for s, _ in curves.values()) + 1e-9

        def px(s, v):
            return L + (s - s0) / (s1 - s0) * (W - L - R), T + (hi - v) / (hi - lo) * (H - T - B)
        colours = [(20, 60, 160), (200, 60, 20), (20, 140, 60), (140, 40, 160), (120, 120, 120)]
        for k, ((st, v), c) in enumerate(zip(curves.items(), colours)):
            steps, y = v
            ema, e = [], y[0]
            for val in y:
                e = smooth * e + (1 - smooth) * val
                ema.append(e)
            d.line([px(a, b) for a, b in zip(steps, y)], fill=tuple(255 - (255 - ch) // 3 for ch in c))
            d.line([px(a, b) for a, b in zip(steps, ema)], fill=c, width=2)
            d.text((W - R + 10, T + 16 * k), f"{st} ({10 ** ema[-1]:.3g})", fill=c)
        for v in np.linspace(lo, hi, 5):   # y ticks (loss values, log scale)
            d.text((4, px(s0, v)[1] - 6), f"{10 ** v:.3g}", fill="black")
        for st in np.linspace(s0, s1, 5):  # x ticks (steps)
            d.text((px(st, lo)[0] - 10, H - B + 8), f"{int(st)}", fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    im.save(path)


def ema_update(ema, model, decay):
    """EMA of the weights: theta_ema <- decay * theta_ema + (1 - decay) * theta; buffers are copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def save_grid(ema, diff, tok, val_batch, cfg, path, device, autoencoder=None, dtype="fp32"):
    """Real validation images (left) beside generated ones for the same layouts (right), boxes drawn."""
    import sample   # sample.py imports this module; import here to keep the dependency one-way at load time
    g = torch.Generator(device="cpu").manual_seed(1234)    # own generator: the training RNG stream is untouched
    x = sample.generate(ema, diff, val_batch["tokens"].to(device), tok.null_prompt().to(device),
                        size=cfg.image_size, steps=cfg.sample_steps, guidance=cfg.guidance, generator=g,
                        dtype=dtype if dtype != "fp16" or device.type == "cuda" else "fp32", progress=False,
                        autoencoder=autoencoder)
    tiles = []
    for real, fake, boxes, labels, valid in zip(val_batch["image"], x.cpu(), val_batch["boxes"],
                                                val_batch["labels"], val_batch["valid"]):
        for im in (real, fake):
            tiles.append(data.draw_layout(data.from_model_range(im), boxes[valid], labels[valid], tok.class_names))
    data.image_grid(tiles, ncol=4).save(path)


# ----------------------------------------------------------------------------------------------------------------
# The training loop

def make_optimizer(raw, cfg):
    """AdamW, weight decay on weight matrices and kernels only (not on biases and norm gains)."""
    decay, no_decay = [p for p in raw.parameters() if p.dim() >= 2], [p for p in raw.parameters() if p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                              dict(params=no_decay, weight_decay=0)], lr=cfg.lr, betas=(0.9, 0.99))


def train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, cfg, step):
    """One optimisation step of the generator on a collated batch (on the device): noise, forward, the loss
    L = L_simple + lambda L_p, backward, clipping, AdamW, EMA. `model` is `raw` wrapped (DDP, compile) or `raw`
    itself. Returns the loss, L_simple and L_p (per image) as tensors. bench.py times this same function."""
    x0 = batch["image"]                                                                 # (B, 3, S, S)
    tokens = batch["tokens"]
    if cfg.p_uncond_attr > 0:                                                           # attributes alone -> [none]
        tokens = drop_attributes(tokens, cfg.p_uncond_attr)
    tokens = drop_condition(tokens, null, cfg.p_uncond)                                 # (B, L), 10% null prompts
    t = torch.randint(0, cfg.timesteps, (x0.shape[0],), device=x0.device)               # t ~ U{0..T-1}
    eps = torch.randn_like(x0)                                                          # eps ~ N(0, I)
    x_t = diff.q_sample(x0, t, eps)                                                     # DDPM Eq. (4), fp32
    weight = foreground_weight(batch["boxes"], batch["valid"], x0.shape[-1]) if cfg.fg_reweight else None
    w_t = timestep_weight(cfg, diff.alpha_bar[t])                                       # (B, 1, 1, 1) or None
    weight = w_t if weight is None else weight if w_t is None else weight * w_t
    # forward under autocast (the losses in fp32)
    with amp:
        if cfg.pal_weight > 0:
            eps_pred, aux = model(x_t, t, tokens, return_features=True)
        else:
            eps_pred = model(x_t, t, tokens)
    l_simple = loss_simple(eps_pred, eps, weight)                                       # DDPM Eq. (14), weighted
    if cfg.pal_weight > 0:                                                              # dropped prompts have no objects
        valid = batch["valid"] & aux["object_valid"]                                    # (B, M)
        l_p = perception.perception_loss(aux["mask_logits"], batch["masks"], valid,
                                         diff.alpha_bar[t])                             # sqrt(alpha_bar_t)(L_m + L_d)
        loss = l_simple + cfg.pal_weight * l_p.mean()                                   # L = L_simple + lambda L_p
    else:
        l_p, loss = torch.zeros((), device=x0.device), l_simple
    # backward, clip, optimizer step, EMA update
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    ema_update(ema, raw, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return loss, l_simple, l_p


def train(cfg, mcfg_overrides=None, interrupt_at=None):
    """Train a generator with settings `cfg` (TrainConfig). `interrupt_at` (tests only) behaves as if the
    process were killed right after that step. Returns the unwrapped model (rank 0 writes the run folder)."""
    # -- processes and device: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])) \
        if ddp else (0, 1, 0)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    dtype, dtype_why = resolve_dtype(cfg.dtype, device)
    if cfg.steps <= 0 and cfg.minutes <= 0:
        raise SystemExit("error: --minutes 0 needs --steps N > 0 (a run needs a time budget or a step count)")
    if cfg.space not in ("pixel", "latent"):
        raise SystemExit(f"error: --space must be pixel or latent, got {cfg.space!r}")

    # -- run folder: never silently overwrite a run
    out = Path(cfg.out or Path("runs") / Path(cfg.data).name)
    ckpt_path, log_path = out / "ckpt.pt", out / "log.txt"
    ck = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"error: {ckpt_path}: no checkpoint to resume from")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    elif ckpt_path.exists():
        raise SystemExit(f"error: {out} already holds a run (ckpt.pt); pass --resume to continue it or --out for a "
                         f"new folder")
    if ddp:
        dist.barrier()                            # every rank has checked the folder before rank 0 writes to it
    if master:
        out.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "a") if master else None

    def log(msg):
        if master:
            tqdm.write(msg)
            logf.write(msg + "\n")
            logf.flush()

    # -- data and tokenizer
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    root = data.resolve_data(cfg.data)
    probe = data.CocoLayoutDataset(root, "train", size=cfg.image_size, min_area=cfg.min_area,
                                   max_objects=cfg.max_objects)
    tok = data.LayoutTokenizer(probe.class_names, bins=cfg.bins, max_objects=cfg.max_objects, location=cfg.location)
    attr_path = attributes_path(cfg, out)           # the perception-aware attribute of every object (PAPER.md s.2)
    attrs = {sp: perception.load_attributes(attr_path, sp) if attr_path else None for sp in ("train", "val")}
    log(f"attributes: {attr_path}" if attr_path else "attributes: none (every object gets the [none] token)")
    train_ds = data.CocoLayoutDataset(root, "train", size=cfg.image_size, min_area=cfg.min_area,
                                      max_objects=cfg.max_objects, shuffle_objects=True, tokenizer=tok,
                                      attributes=attrs["train"])
    val_ds = data.CocoLayoutDataset(root, "val", size=cfg.image_size, min_area=cfg.min_area,
                                    max_objects=cfg.max_objects, tokenizer=tok, attributes=attrs["val"])
    val_batch = data.collate([val_ds[i] for i in range(min(cfg.n_grid, len(val_ds)))], cfg.max_objects)
    null = tok.null_prompt().to(device)

    # -- latent space: the frozen autoencoder (the one a resumed run learned with) encodes every image once
    ae = ae_info = latents = None
    if cfg.space == "latent":
        ae_path = autoencoder_path(cfg, out)
        ae, fp = load_autoencoder(ae_path, ck["autoencoder"]["fingerprint"] if ck else None, ckpt_path)
        ae, ae_info = ae.to(device), dict(path=str(ae_path), fingerprint=fp)
        latents = encode_dataset(ae, train_ds, device, progress=master)            # (N, c, S/f, S/f)
        log(f"latent space: {ae_path} ({fp}) encodes {cfg.image_size}px images as {tuple(latents.shape[1:])} latents")

    # -- model, EMA, optimizer (the checkpoint's shapes win on resume)
    overrides = dict(dict(mask_dim=0) if cfg.pal_weight == 0 else {}, **(mcfg_overrides or {}))
    if ae is not None:
        overrides["in_channels"] = ae.cfg.latent_channels
    mcfg = UNetConfig(**ck["model_cfg"]) if ck else UNetConfig.for_tokenizer(tok, **overrides)
    if cfg.pal_weight > 0 and not mcfg.mask_dim:
        raise SystemExit("error: --pal-weight > 0 needs the perception head (--mask-dim > 0)")
    raw = UNet(mcfg, loc_xy=tok.location_xy()).to(device)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    diff = Diffusion(cfg.timesteps, cfg.schedule).to(device)
    opt = make_optimizer(raw, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    step, history = 0, dict(step=[], loss=[], l_simple=[], l_p=[])
    if ck:
        raw.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        step, history = ck["step"], ck["history"]
        set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        log(f"resumed {ckpt_path} at step {step}")
    model = raw
    if ddp:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[local] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    amp = torch.autocast(device.type, dtype=dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[dtype],
                         enabled=dtype != "fp32")
    if master and not ck:
        (out / "config.json").write_text(json.dumps(dict(train=asdict(cfg), model=asdict(mcfg)), indent=1))
        log(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(train_ds)} train images, "
            f"{world} process(es) on {device}, dtype {dtype} ({dtype_why}), run folder {out}")

    def checkpoint():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            atomic_save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                             scaler=scaler.state_dict(), step=step, rng=states, history=history,
                             elapsed=time.time() - t0, finished=finished,
                             train_cfg=asdict(cfg), model_cfg=asdict(mcfg), img_s=seen / max(time.time() - t_start, 1e-9),
                             attributes_used=str(attr_path) if attr_path else "", space=cfg.space, dtype=dtype,
                             autoencoder=ae_info,
                             tokenizer=dict(class_names=tok.class_names, category_ids=probe.category_ids, bins=tok.bins,
                                            max_objects=tok.max_objects, location=tok.location)), ckpt_path)

    def periodic_outputs():
        if master:
            save_grid(ema, diff, tok, val_batch, cfg, out / f"samples_{step:06d}.png", device, ae, dtype)
            curves = {k: (history["step"], history[k]) for k in ("loss", "l_simple", "l_p") if history.get(k)}
            loss_curve(curves, out / "loss.png", f"{out.name}: training loss (log scale)")

    # -- the loop
    finished = False
    t0, seen = time.time() - (ck["elapsed"] if ck else 0.0), 0
    # the progress bar counts steps when a step cap is the run's length, else the seconds of the time budget
    by_time = cfg.minutes > 0 and cfg.steps <= 0
    bar = tqdm(total=round(60 * cfg.minutes) if by_time else cfg.steps, initial=round(time.time() - t0) if by_time
               else step, unit="s" if by_time else "it", disable=not master, dynamic_ncols=True)
    raw.train()
    t_start = time.time()                         # for images/s (t0 also counts the time before a resume)
    while cfg.steps <= 0 or step < cfg.steps:
        elapsed = torch.tensor([time.time() - t0], dtype=torch.float64)
        if ddp and cfg.minutes > 0:
            dist.broadcast(elapsed, 0)            # every rank uses rank 0's clock: same lr, same stop step
        if cfg.minutes > 0 and elapsed.item() > 60 * cfg.minutes:
            log(f"time budget of {cfg.minutes} minutes reached at step {step}")
            break
        progress = max(step / cfg.steps if cfg.steps > 0 else 0.0,
                       elapsed.item() / (60 * cfg.minutes) if cfg.minutes > 0 else 0.0)
        # lr for this step
        lr = lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # batch: the layouts' images, tokens, boxes and masks; then one step (train_step: the paper's loss)
        idx = batch_indices(len(train_ds), cfg.batch_size, step, cfg.seed, rank, world)
        batch = data.collate([train_ds[i] for i in idx], cfg.max_objects)
        if latents is not None:
            batch["image"] = latents[idx]         # latent space: x_0 is the image's scaled latent (L_LDM)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, l_simple, l_p = train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, cfg, step)
        step += 1
        seen += batch["image"].shape[0] * world
        # log line (the loss is averaged over processes so every rank takes the same decision)
        lv = torch.stack([loss.detach().float(), l_simple.detach().float(), l_p.detach().float().mean()])
        if ddp:
            dist.all_reduce(lv)
            lv /= world
        lv, ls, lp = lv.tolist()
        if not math.isfinite(lv):
            log(f"error: non-finite loss ({lv}) at step {step}; stopping (last good checkpoint: {ckpt_path})")
            raise SystemExit(f"error: non-finite loss ({lv}) at step {step}")
        history["step"].append(step)
        history["loss"].append(lv)
        history["l_simple"].append(ls)
        if cfg.pal_weight > 0:
            history["l_p"].append(lp)
        ips = seen / max(time.time() - t_start, 1e-9)
        bar.update(min(round(time.time() - t0), bar.total) - bar.n if by_time else 1)
        bar.set_postfix(step=step, loss=f"{lv:.4f}", L_p=f"{lp:.3f}", img_s=f"{ips:.1f}")
        if step % cfg.log_every == 0:
            log(f"step {step} loss {lv:.4f} (L_simple {ls:.4f} L_p {lp:.4f}) lr {lr:.2e} {ips:.1f} img/s "
                f"{time.time() - t0:.0f}s")
        # periodic sample grid and checkpoint
        if cfg.sample_every and step % cfg.sample_every == 0:
            periodic_outputs()
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            checkpoint()
        if interrupt_at is not None and step >= interrupt_at:
            bar.close()
            return raw
    bar.close()
    # -- end: final checkpoint, grid and loss curve
    finished = True
    checkpoint()
    if not (cfg.sample_every and step % cfg.sample_every == 0):
        periodic_outputs()
    log(f"done: step {step}, {time.time() - t0:.0f}s, {seen / max(time.time() - t_start, 1e-9):.1f} img/s; "
        f"checkpoint {ckpt_path}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return raw


# ----------------------------------------------------------------------------------------------------------------
# Latent space (--space latent): the autoencoder stage, trained on the real images and then frozen (issue 6)

def image_gradients(x):
    """Finite differences along x and y of (B, C, H, W) images: the autoencoder's optional edge term."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def psnr(a, b):
    """Mean over images of 10 log10(1 / MSE) with both (B, C, H, W) batches mapped from [-1, 1] to [0, 1]."""
    mse = (((a.float() - b.float()) / 2) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * mse.log10()).mean())


def reconstruction_grid(images, reconstructions, path, n=8):
    """Val images (top row) over their autoencoder reconstructions (bottom row), as a PNG."""
    tiles = [data.from_model_range(x) for x in images[:n]] + [data.from_model_range(x) for x in reconstructions[:n]]
    big = [Image.fromarray(t).resize((2 * t.shape[1], 2 * t.shape[0]), Image.NEAREST) for t in tiles]
    data.image_grid(big, ncol=min(n, len(images))).save(path)


def ae_fingerprint(state):
    """A short hash of an autoencoder's weights (and scale): a latent generator records the one it learned."""
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:12]


def dataset_images(ds, idx):
    """Images idx of a data.CocoLayoutDataset as one (B, 3, S, S) batch in [-1, 1]."""
    return torch.stack([data.to_model_range(ds.load(i)["image"]) for i in idx])


@torch.no_grad()
def encode_dataset(ae, ds, device, batch=64, progress=True):
    """The scaled latents of every image of a dataset, in its order: (N, c, S/f, S/f). The encoder is
    deterministic and the images are not augmented, so a run encodes them once."""
    out = [ae.encode(dataset_images(ds, range(s, min(s + batch, len(ds)))).to(device))
           for s in tqdm(range(0, len(ds), batch), desc="encoding", leave=False, disable=not progress)]
    return torch.cat(out)


def autoencoder_path(cfg, out):
    return Path(out) / "autoencoder.pt" if cfg.autoencoder == "auto" else Path(cfg.autoencoder)


def load_autoencoder(path, expect=None, owner=""):
    """autoencoder.pt -> (frozen Autoencoder in eval mode, fingerprint). `expect`: the fingerprint a checkpoint
    (`owner`) recorded; another autoencoder is an error (its latents mean something else)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path}: autoencoder not found (train one with python detdiff.py --space latent "
                         f"--stage autoencoder, or pass --autoencoder PATH)")
    try:
        f = torch.load(path, map_location="cpu", weights_only=False)
        ae = Autoencoder(AutoencoderConfig(**f["cfg"]))
        ae.load_state_dict(f["model"])
    except (KeyError, RuntimeError, EOFError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {path}: not a detdiff autoencoder ({type(e).__name__}: {str(e)[:120]})") from None
    fp = ae_fingerprint(ae.state_dict())
    if expect and fp != expect:
        raise SystemExit(f"error: {path}: autoencoder {fp} is not the one {owner or 'the checkpoint'} was trained "
                         f"with ({expect}); pass that one with --autoencoder")
    return ae.eval().requires_grad_(False), fp


def train_autoencoder(cfg, root, path, log=print):
    """The first stage of the latent space: L1 reconstruction of the real training images (+ ae_edge_weight x L1
    of their gradients), AdamW with the generator's warm-up and cosine schedule; then the latent scale
    1 / std(E(x)) over the training images (SD's fixed 0.18215, measured here), and the PSNR on val images.
    Writes `path` (weights, config, fingerprint, PSNR) and beside it a PNG of val reconstructions; returns the
    summary dict."""
    torch.manual_seed(cfg.seed)
    kw = dict(size=cfg.image_size, min_area=cfg.min_area, max_objects=cfg.max_objects)
    train_ds, val_ds = data.CocoLayoutDataset(root, "train", **kw), data.CocoLayoutDataset(root, "val", **kw)
    ae = Autoencoder(AutoencoderConfig(channels=cfg.ae_channels, latent_channels=cfg.ae_latent_channels,
                                       factor=cfg.ae_factor))
    opt, t0 = make_optimizer(ae, cfg), time.time()
    bar = tqdm(range(cfg.ae_steps), desc="autoencoder", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, step / cfg.ae_steps)
        x = dataset_images(train_ds, batch_indices(len(train_ds), cfg.batch_size, step, cfg.seed))
        x_rec = ae(x)
        loss = (x_rec - x).abs().mean()                                                        # L1
        if cfg.ae_edge_weight:
            loss = loss + cfg.ae_edge_weight * sum((a - b).abs().mean()
                                                   for a, b in zip(image_gradients(x_rec), image_gradients(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % max(cfg.ae_steps // 5, 1) == 0:
            log(f"[autoencoder] step {step + 1}/{cfg.ae_steps} L1 {loss.item():.4f} {time.time() - t0:.0f}s")
    ae.eval()
    with torch.no_grad():
        ae.scale.fill_(1.0 / encode_dataset(ae, train_ds, "cpu", progress=False).std().item())   # unit-variance z
        val = dataset_images(val_ds, range(min(256, len(val_ds))))
        rec = ae.decode(ae.encode(val))
        val_psnr = psnr(rec, val)
    reconstruction_grid(val, rec, Path(path).with_suffix(".png"))
    info = dict(psnr_val=round(val_psnr, 2), scale=round(ae.scale.item(), 5), steps=cfg.ae_steps,
                seconds=round(time.time() - t0, 1), image_size=cfg.image_size, data=str(root),
                latent_shape=[cfg.ae_latent_channels, cfg.image_size // cfg.ae_factor, cfg.image_size // cfg.ae_factor])
    atomic_save(dict(model=ae.state_dict(), cfg=asdict(ae.cfg), fingerprint=ae_fingerprint(ae.state_dict()), **info),
                path)
    log(f"[autoencoder] {path}: {cfg.image_size}px -> latents {info['latent_shape']}, val PSNR {val_psnr:.2f} dB, "
        f"scale {info['scale']}, {info['seconds']:.0f}s")
    return info


# ----------------------------------------------------------------------------------------------------------------
# The main job: data -> detector -> attributes -> generator -> grid, then a summary (PAPER.md sections 1-3)

STAGES = ("data", "detector", "attributes", "autoencoder", "generator", "grid")
SAME_RUN = ("data", "image_size", "bins", "location", "max_objects", "min_area", "pal_weight", "attributes",
            "detector", "detector_weights", "detector_classes", "det_steps", "det_size", "attr_steps", "attr_folds",
            "gamma", "beta", "class_aware", "seed", "space",
            "autoencoder", "ae_steps", "ae_factor", "ae_channels", "ae_latent_channels", "ae_edge_weight")


def pipeline(cfg, mcfg_overrides=None):
    """Run the stages of the main job into one run folder; a stage whose output exists is reused (and says so)."""
    import evaluate   # evaluate.py and sample.py import this module: import here, one-way at load time
    import sample
    out = Path(cfg.out or Path("runs") / Path(cfg.data).name)
    cfg.out = str(out)
    if cfg.stage not in ("all",) + STAGES:
        raise SystemExit(f"error: --stage must be all or one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.space not in ("pixel", "latent"):
        raise SystemExit(f"error: --space must be pixel or latent, got {cfg.space!r}")
    root = data.resolve_data(cfg.data)               # a missing or bad data set stops before anything is written
    if cfg.detector and not cfg.detector.startswith("torchvision:"):   # evaluate.py reopens it from any folder
        cfg.detector = str(Path(cfg.detector).resolve())
    if cfg.detector_weights:
        cfg.detector_weights = str(Path(cfg.detector_weights).resolve())
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(cfg, k) for k in SAME_RUN}
    saved = out / "pipeline.json"
    if saved.is_file():   # reusing a stage is only right if it was made with the same settings
        old = data.read_json(saved)
        default = {f.name: f.default for f in fields(TrainConfig)}     # a setting added since: its default then
        diff = sorted(k for k in SAME_RUN if old.get(k, default[k]) != settings[k])
        if diff:
            raise SystemExit(f"error: {out} holds a run made with other settings ({', '.join(diff)}); "
                             f"choose a new --out")
        if set(SAME_RUN) - set(old):
            saved.write_text(json.dumps(settings, indent=1))
    else:
        saved.write_text(json.dumps(settings, indent=1))
    logf = open(out / "log.txt", "a")

    def log(msg):
        tqdm.write(msg)
        logf.write(msg + "\n")
        logf.flush()
    run = set(STAGES) if cfg.stage == "all" else {cfg.stage}
    t_all, summary = time.time(), dict(run=str(out))
    timing = {}

    # -- data: the embedded `shapes` set is built on first use; a COCO folder is checked
    t = time.time()
    det_cfg = dict(size=cfg.det_size, min_area=cfg.min_area, max_objects=cfg.max_objects)
    train_ds, val_ds = (data.CocoLayoutDataset(root, sp, **det_cfg) for sp in ("train", "val"))
    summary["data"] = dict(root=str(root), classes=list(train_ds.class_names), train_images=len(train_ds),
                           val_images=len(val_ds))
    timing["data"] = time.time() - t
    log(f"[data] {root}: {len(train_ds)} train / {len(val_ds)} val images, classes {', '.join(train_ds.class_names)}")

    # -- detector: the user's (--detector), or trained from scratch on the real training split; the perception
    #    metric of every later stage and, with --detector, the attribute's too
    det_path, det_json = out / "detector.pt", out / "detector.json"
    given = perception.run_detector(out, asdict(cfg), train_ds.class_names, train_ds.category_ids) \
        if cfg.detector else None                 # classes checked here, before anything is trained
    if "detector" in run:
        t = time.time()
        if det_json.is_file() and (given is not None or det_path.is_file()):
            log(f"[detector] reusing {det_json}")
        elif given is not None:
            val_src = given.subset({r["image_id"] for r in val_ds.records}) \
                if isinstance(given, perception.ResultsFile) else given
            r = perception.evaluate(val_src, val_ds, crowd_json=data.split_paths(root, "val")[0])
            det_json.write_text(json.dumps(dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"], seconds=0.0,
                                                source=perception.describe(given),
                                                per_category=r["per_category"]), indent=1))
            log(f"[detector] given: {perception.describe(given)}; val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f}")
        else:
            det = perception.train(train_ds, perception.DetectorConfig(
                len(train_ds.class_names), tuple(train_ds.class_names), cfg.det_size),
                perception.DetTrainConfig(steps=cfg.det_steps, seed=cfg.seed, log_every=max(cfg.det_steps // 5, 1)), log=log)
            secs = time.time() - t
            perception.save_detector(det, det_path)
            r = perception.evaluate(det, val_ds, crowd_json=data.split_paths(root, "val")[0])
            det_json.write_text(json.dumps(dict(mAP=r["mAP"], AP50=r["AP50"], AP75=r["AP75"], seconds=round(secs, 1),
                                                per_category=r["per_category"]), indent=1))
            log(f"[detector] trained in {secs:.0f}s: val mAP {r['mAP']:.3f} AP50 {r['AP50']:.3f} AP75 {r['AP75']:.3f}")
        timing["detector"] = time.time() - t
    if det_json.is_file():
        summary["detector"] = data.read_json(det_json)

    # -- attributes: [easy] / [hard] for every object from held-out-fold detectors (PAPER.md section 2)
    attr_path = out / "attributes.json"
    if "attributes" in run and cfg.attributes == "auto":
        t = time.time()
        if attr_path.is_file():
            log(f"[attributes] reusing {attr_path}")
        else:
            perception.make_attributes(root, out, perception.AttributeConfig(
                gamma=cfg.gamma, beta=cfg.beta, class_aware=cfg.class_aware, folds=cfg.attr_folds,
                image_size=cfg.det_size, min_area=cfg.min_area, max_objects=cfg.max_objects, steps=cfg.attr_steps,
                seed=cfg.seed), source=given, log=log)      # given=None: held-out folds of our own detector
        timing["attributes"] = time.time() - t
    if attr_path.is_file() and cfg.attributes == "auto":
        s = data.read_json(attr_path)["summary"]["train"]
        summary["attributes"] = dict(hard_fraction=s["hard_fraction"],
                                     per_category={k: v["hard_fraction"] for k, v in s["per_category"].items()},
                                     per_nuisance={k: v["hard_fraction"] for k, v in s.get("per_nuisance", {}).items()},
                                     warning=s.get("warning"))

    # -- autoencoder (--space latent, or asked for by name): trained on the real images, then frozen
    ae_path = autoencoder_path(cfg, out)
    if "autoencoder" in run and (cfg.space == "latent" or cfg.stage == "autoencoder"):
        t = time.time()
        if ae_path.is_file():
            log(f"[autoencoder] reusing {ae_path}")
        elif cfg.autoencoder != "auto":
            raise SystemExit(f"error: {ae_path}: autoencoder not found")
        else:
            train_autoencoder(cfg, root, ae_path, log)
        timing["autoencoder"] = time.time() - t
    if cfg.space == "latent" and ae_path.is_file():
        f = torch.load(ae_path, map_location="cpu", weights_only=False)
        summary["autoencoder"] = {k: f.get(k) for k in ("psnr_val", "scale", "latent_shape", "seconds", "fingerprint")}

    # -- generator: the layout-conditioned UNet with the perception loss
    ckpt_path = out / "ckpt.pt"
    if "generator" in run:
        t = time.time()
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else None
        if ck is not None and ck.get("finished") and not cfg.resume:
            log(f"[generator] reusing {ckpt_path} (step {ck['step']})")
        else:
            logf.flush()
            train(cfg, mcfg_overrides)
        timing["generator"] = time.time() - t
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        h = ck["history"]
        summary["generator"] = dict(steps=ck["step"], minutes=round(ck["elapsed"] / 60, 2), dtype=ck.get("dtype"),
                                    img_s=round(ck.get("img_s", 0.0), 1), finished=bool(ck.get("finished")),
                                    loss_last100=round(float(np.mean(h["loss"][-100:])), 4),
                                    l_p_last100=round(float(np.mean(h["l_p"][-100:])), 4) if h.get("l_p") else None)

    # -- grid: the same val layouts as origin / all-easy / all-hard, and a quick layout-fidelity check
    if "grid" in run:
        t = time.time()
        grid_path, fid_json = out / "easy_hard.png", out / "fidelity.json"
        if grid_path.is_file() and fid_json.is_file():
            log(f"[grid] reusing {grid_path}")
        else:
            for need in (ckpt_path,) if given is not None else (ckpt_path, det_path):
                if not need.is_file():
                    raise SystemExit(f"error: {need}: missing; run the stage that makes it first (--stage all)")
            model, tok, diff, ck = sample.load_checkpoint(ckpt_path)
            S, names = ck["train_cfg"]["image_size"], tok.class_names
            kw = dict(steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed, progress=False,
                      autoencoder=sample.checkpoint_autoencoder(ck, ckpt_path),
                      attr_guidance=sample.resolve_attr_guidance(cfg.attr_guidance, ck))
            lays = sample.val_layouts(ck, max(cfg.n_grid, cfg.n_eval))
            real_ds = data.CocoLayoutDataset(root, "val", size=S, check_files=False)
            real = [real_ds.load(i)["image"] for i in range(len(lays))]
            t_s = time.time()
            origin = sample.generate_layouts(model, diff, tok, lays, S, **kw)
            sec_per_img = (time.time() - t_s) / len(lays)
            gen = dict(origin=origin, **{d: sample.generate_layouts(model, diff, tok, sample.with_difficulty(
                lays[:cfg.n_grid], d), S, **kw) for d in ("easy", "hard")})
            evaluate.easy_hard_figure(real, gen, lays, names, grid_path, n=cfg.n_grid)
            # layout fidelity (the paper's YOLO score, quick version; evaluate.py has the full one): the
            # real-trained detector on generated images vs on the real val images at the same resolution S
            det = given if given is not None else perception.load_detector(det_path)
            fid = dict(n_layouts=len(lays), sampler=f"ddim{cfg.sample_steps}", guidance=cfg.guidance,
                       sec_per_img=round(sec_per_img, 4))
            if isinstance(det, perception.ResultsFile):   # a results json has not seen the generated images
                sample.write_coco(out / "fidelity_generated", "val", origin, lays, names,
                                  ck["tokenizer"]["category_ids"])
                fid["note"] = (f"no fidelity score: {cfg.detector} is a results json; run that detector on "
                               f"{out / 'fidelity_generated'} and score it with `python perception.py eval --data "
                               f"{out / 'fidelity_generated'} --results YOURS.json`")
                log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); {fid['note']}")
            else:
                for name, ims in (("real", real), ("generated", origin)):
                    fid[name] = evaluate.detector_ap(det, ims, lays, names, ck["tokenizer"]["category_ids"],
                                                     out / f"fidelity_{name}", cfg.det_size, cfg.max_objects)
                log(f"[grid] {grid_path} (rows: real, origin, all easy, all hard); detector AP50 on {len(lays)} val "
                    f"layouts at {S}px: real {fid['real']['AP50']:.3f}, generated {fid['generated']['AP50']:.3f}; "
                    f"{sec_per_img:.3f} s per generated image")
            fid_json.write_text(json.dumps(fid, indent=1))
        timing["grid"] = time.time() - t
        if fid_json.is_file():
            summary["fidelity"] = data.read_json(fid_json)

    # -- summary
    summary["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    summary["seconds"]["total"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(summary_text(summary))
    logf.close()
    if cfg.evaluate:                              # the paper's experiments on this run (evaluate.py)
        blind = ("fidelity", "easy_hard") if isinstance(given, perception.ResultsFile) else ()   # see evaluate.py
        summary["evaluate"] = evaluate.evaluate(out, evaluate.EvalConfig(
            parts=",".join(p for p in evaluate.PARTS if p not in blind)))
    return summary


def summary_text(s):
    lines = [f"== summary of {s['run']} =="]
    if "detector" in s:
        d = s["detector"]
        lines.append(f"detector   val mAP {d['mAP']:.3f}  AP50 {d['AP50']:.3f}  AP75 {d['AP75']:.3f}  "
                     + (f"(given: {d['source']})" if d.get("source") else f"(trained in {d['seconds']:.0f}s)"))
    if "attributes" in s:
        a = s["attributes"]
        per = a["per_nuisance"] or a["per_category"]
        lines.append(f"attributes {100 * a['hard_fraction']:.1f}% hard; per {'nuisance' if a['per_nuisance'] else 'category'}"
                     ": " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per.items()))
        if a.get("warning"):
            lines.append(f"           {a['warning']}")
    if "autoencoder" in s:
        a = s["autoencoder"]
        lines.append(f"autoencoder latents {a['latent_shape']}, val PSNR {a['psnr_val']:.2f} dB, scale {a['scale']}, "
                     f"trained in {a['seconds']:.0f}s")
    if "generator" in s:
        g = s["generator"]
        lines.append(f"generator  {g['steps']} steps in {g['minutes']:.1f} min ({g['img_s']} img/s"
                     + (f", {g['dtype']}" if g.get("dtype") else "") + "), "
                     f"loss {g['loss_last100']}" + (f" (L_p {g['l_p_last100']})" if g["l_p_last100"] is not None
                                                     else " (no perception loss)") + " over the last 100 steps")
    if "fidelity" in s and "generated" not in s["fidelity"]:
        lines.append(f"fidelity   {s['fidelity']['note']}")
    elif "fidelity" in s:
        f = s["fidelity"]
        lines.append(f"fidelity   detector AP50 on {f['n_layouts']} val layouts: generated "
                     f"{f['generated']['AP50']:.3f} vs real {f['real']['AP50']:.3f} (mAP {f['generated']['mAP']:.3f}"
                     f" vs {f['real']['mAP']:.3f}); {f['sec_per_img']:.3f} s per image")
    lines.append("time       " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def main(argv=None):
    targs, margs = split_args(parse_flags(argv))
    if targs.get("resume"):
        out = Path(targs.get("out") or Path("runs") / Path(targs.get("data", "shapes")).name)
        ck_path = out / "ckpt.pt"
        if not ck_path.is_file():
            raise SystemExit(f"error: {ck_path}: no checkpoint to resume from")
        saved = torch.load(ck_path, map_location="cpu", weights_only=False)
        changed = {k: v for k, v in targs.items()
                   if k not in RESUME_OVERRIDES and saved["train_cfg"].get(k, getattr(TrainConfig, k)) != v}
        if changed or margs:
            raise SystemExit(f"error: --resume keeps the run's saved settings; these differ: "
                             f"{sorted(changed) + sorted(margs)} (only {sorted(RESUME_OVERRIDES)} may change)")
        targs = {**saved["train_cfg"], **targs, "out": str(out)}
    cfg = TrainConfig(**targs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun: the generator stage only, every rank trains
        if cfg.stage != "generator":
            raise SystemExit("error: under torchrun pass --stage generator (the other stages run in one process: "
                             "python detdiff.py --stage detector / attributes / grid)")
        train(cfg, margs)
        return
    try:
        pipeline(cfg, margs)
    except data.DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
