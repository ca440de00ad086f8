"""Sampling from a trained generator (docs/paper.md sections 1-2 and 4): classifier-free guidance
and the attribute guidance that makes [easy] / [hard] show (`guided_eps`), the sampling loop over
DDPM ancestral sampling, DDIM and DPM-Solver++ (2M) (`generate`; their update rules are
diffusion.py's), the perception head's instance masks read off the same forward passes
(`object_masks`), and a model rebuilt from its checkpoint alone (`load_checkpoint`: its config,
tokenizer and schedule settings travel inside it).

    python sample.py --ckpt checkpoints/shapes/ckpt.pt --out runs/samples     # 16 val layouts of the shipped model
    python sample.py --ckpt runs/shapes/ckpt.pt --difficulty hard --n 64 --out runs/shapes/hard
    python sample.py --ckpt runs/shapes/ckpt.pt --layouts my_layouts.json --sampler ddpm

The command writes a labelled data set (COCO and YOLO folders, instance masks, a grid); that is
tooling, so its command line lives in data_sets/export.py, and docs/sampling.md describes it. """
import contextlib
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
import data
import diffusion
import perception
from config import DataError
from diffusion import ATTR_GUIDANCE, Diffusion, drop_attributes
from unet import UNet, UNetConfig


# --------------------------------------------------------------------------------------------------
# Guidance and the sampling loop

def guided_eps(model, x_t, t, tokens, null_tokens, guidance, amp=None, attr_guidance=1.0,
               masks=False):
    """Classifier-free guidance: eps = eps(x, null) + s (eps(x, layout) - eps(x, null)) (Ho &
    Salimans Eq. 6), both prompts in one batched forward.

    attr_guidance w_d != 1 (beyond the paper) also guides on the attribute alone, with the layout's
    [none] version (`diffusion.drop_attributes`, which a run trains with --p-uncond-attr) as a third
    prediction: eps = eps(x, null) + s [(eps(x, layout [none]) - eps(x, null)) + w_d (eps(x, layout
        d) - eps(x, layout [none]))]
    InstructPix2Pix's two-condition guidance (Brooks et al., CVPR 2023, Eq. 3) with s_I = s and s_T
    = s w_d: w_d = 1 is the plain guidance above, w_d = 0 the guidance of the [none] prompt, w_d > 1
    pushes every object further towards its [easy] / [hard]. All three predictions in one batched
    forward. masks=True also returns the perception head's mask probabilities of the layout's
    objects (B, M, h, w), read off the same forward (its conditional half)."""
    amp = amp or contextlib.nullcontext()
    # layout, every attr [none]
    plain = drop_attributes(tokens, 1.0) if attr_guidance != 1.0 else tokens
    B = x_t.shape[0]
    if guidance == 1.0 and attr_guidance == 1.0:
        prompts = [tokens]
    elif attr_guidance == 1.0:
        prompts = [tokens, null_tokens.expand(B, -1)]
    else:
        prompts = [tokens, plain, null_tokens.expand(B, -1)]
    n = len(prompts)
    with amp:
        args = (torch.cat([x_t] * n), torch.cat([t] * n), torch.cat(prompts))
        out = model(*args, return_features=True) if masks else model(*args)
    e, aux = (out[0].float(), out[1]) if masks else (out.float(), None)
    if n == 1:
        eps = e
    elif n == 2:
        e_cond, e_null = e[:B], e[B:]
        eps = e_null + guidance * (e_cond - e_null)
    else:
        e_cond, e_plain, e_null = e[:B], e[B:2 * B], e[2 * B:]
        eps = e_null + guidance * ((e_plain - e_null) + attr_guidance * (e_cond - e_plain))
    return (eps, aux["mask_logits"][:B].float().sigmoid()) if masks else eps


SAMPLERS = ("ddim", "ddpm", "dpm++2m")
# The one sampling default (sample.py's command, evaluate): DPM-Solver++ (2M) in 20 steps, which
# scored as DDIM in 25 at half the time
# (docs/experiments.md#the-main-job-in-15-minutes-on-a-cpu-without-bf16). The main job's grid stage
# and the training loop's sample grids take 15 steps of it instead (TrainConfig.sample_steps), to
# leave the generator more of the main job's budget.
SAMPLER, STEPS = "dpm++2m", 20
MASK_STEPS = 3          # exported masks: the head's probability averaged over the last 3 sampling
                        # steps (docs/sampling.md compares 1, 3 and 5 against the objects the images
                        # drew)


@torch.no_grad()
def generate(model, diff, tokens, null_tokens, size=None, steps=STEPS, sampler=SAMPLER, eta=0.0,
             guidance=3.0,
             generator=None, dtype="fp32", clip=True, progress=True, autoencoder=None,
             attr_guidance=1.0,
             mask_steps=0):
    """Sample images (B, C, S, S) in [-1, 1] for layout tokens (B, L). DDIM uses `steps` evenly
    spaced timesteps from T-1 down to 0, DPM-Solver++ (2M) `steps` timesteps uniform in log-SNR
    (`diffusion.logsnr_grid`); DDPM always walks all T steps. Noise comes from `generator` (CPU). A
    latent-space model (`autoencoder`, the frozen one it learned with) samples latents of side S / f
    without the [-1, 1] clipping of x_0 (latents are not bounded) and returns them decoded.
    mask_steps=k > 0: also the perception head's mask probability of every layout object (B, M, S,
    S), the mean over the last k sampling steps (small t, where x_t is nearly the finished image),
    upsampled from the latent side in latent mode: returns (images, masks)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    cfg, dev = model.cfg, tokens.device
    size = size or 32
    if autoencoder is not None:
        size, clip = size // autoencoder.cfg.factor, False
    B, was_training = tokens.shape[0], model.training
    model.eval()
    amp = config.autocast(dev, dtype)
    if attr_guidance != 1.0 and not bool(
        ((tokens == diffusion.EASY_ID) | (tokens == diffusion.HARD_ID)).any()
    ):
        attr_guidance = 1.0   # no [easy] / [hard] to guide on: skip the third prediction (one sync)
    # the noise comes from the CPU generator, then moves: the same seed gives the same images on
    # every device
    # noqa: E731
    randn = lambda: torch.randn(B, cfg.in_channels, size, size, generator=generator).to(dev)
    x = randn()                                           # x at the grid's first timestep ~ N(0, I)
    if sampler == "ddpm":
        ts = list(range(diff.T - 1, -1, -1))
    elif sampler == "ddim":
        ts = torch.linspace(diff.T - 1, 0, steps).round().long().unique_consecutive().tolist()
    else:
        ts = diffusion.logsnr_grid(diff, steps)
    x0_last = h_last = mask_sum = None                                        # DPM-Solver++ history
    if mask_steps and model.mask_head is None:
        raise ValueError("mask_steps needs a model with a perception head (it was trained with "
                         "--pal-weight 0)")
    for i, t_int in enumerate(tqdm(ts, disable=not progress, desc=f"{sampler} x{B}", leave=False)):
        t = torch.full((B,), t_int, dtype=torch.long, device=dev)
        if i >= len(ts) - mask_steps:                                             # the last k steps
            eps, m = guided_eps(model, x, t, tokens, null_tokens, guidance, amp, attr_guidance,
                                masks=True)
            mask_sum = m if mask_sum is None else mask_sum + m
        else:
            eps = guided_eps(model, x, t, tokens, null_tokens, guidance, amp, attr_guidance)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        if sampler == "ddpm":
            x = diffusion.ddpm_step(diff, x, t, eps, randn(), clip)
        elif sampler == "ddim":
            x = diffusion.ddim_step(diff, x, t, torch.full_like(t, t_prev), eps,
                                    randn() if eta > 0 else torch.zeros_like(x), eta, clip)
        else:
            x0, _ = diffusion.x0_and_eps(diff, x, t, eps, clip)
            x, h = diffusion.dpm2m_step(diff, x, t, t_prev, x0, x0_last, h_last)
            x0_last, h_last = x0, h
    model.train(was_training)
    x = autoencoder.decode(x.float()) if autoencoder is not None else x
    if not mask_steps:
        return x
    probs = mask_sum / min(mask_steps, len(ts))
    if probs.shape[-1] != x.shape[-1]:
        probs = F.interpolate(probs, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x, probs


def resolve_attr_guidance(w, ck):
    """w_d to sample a checkpoint with: w itself when >= 0; for -1 (auto) diffusion.ATTR_GUIDANCE
    when the run trained the [none] prediction (--p-uncond-attr > 0), else 1 (plain guidance)."""
    if w >= 0:
        return w
    return ATTR_GUIDANCE if ck["train_cfg"].get("p_uncond_attr", 0) > 0 else 1.0


# --------------------------------------------------------------------------------------------------
# Checkpoints and layouts


def load_checkpoint(path, weights="ema", device="cpu"):
    """A checkpoint alone -> (eval-mode model, tokenizer, diffusion, its dict); a bad file: a
    DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ck = config.load_file(path)
        # a sidecar moved with the checkpoint
        side = Path(path).parent / Path(ck.get("attributes_used") or "-").name
        if ck.get("attributes_used") and not Path(ck["attributes_used"]).is_file() and side.is_file():
            ck["attributes_used"] = str(side)
        model = UNet(config.from_saved(UNetConfig, ck["model_cfg"]))
        model.load_state_dict(ck[weights])
        diff = Diffusion(ck["train_cfg"]["timesteps"], ck["train_cfg"]["schedule"]).to(device)
    except (KeyError, RuntimeError, EOFError, TypeError, pickle.UnpicklingError) as e:
        why = " ".join(str(e).split())[:120]          # load_state_dict's message spans lines
        raise DataError(f"{path}: not a detdiff checkpoint ({type(e).__name__}: {why})") from None
    return model.to(device).eval(), data.tokenizer_from(ck["tokenizer"]), diff, ck


def split_layouts(ck, n, split="val"):
    """The first n layouts of the run's data split, with the attributes the run trained with
    ("origin")."""
    c = ck["train_cfg"]
    attrs = None
    if ck.get("attributes_used"):
        if not Path(ck["attributes_used"]).is_file():
            raise DataError(f"{ck['attributes_used']}: the attribute sidecar this run trained with "
                            f"is missing (restore it, or sample from a --layouts json)")
        side = config.read_json(ck["attributes_used"])["attributes"]
        attrs = perception.load_attributes(ck["attributes_used"], split) if split in side else None
    ds = data.CocoLayoutDataset(data.resolve_data(c["data"]), split, size=c["image_size"],
                                min_area=c["min_area"],
                                max_objects=c["max_objects"], attributes=attrs)
    return [{k: ds[i][k] for k in ("boxes", "labels", "difficulty")} for i in range(min(n, len(ds)))]


def object_masks(probs, layouts, threshold=0.5):
    """The instance masks of generated objects: the perception head's probability (from
    `generate(mask_steps=k)`) above `threshold`, kept inside the object's box (data.box_pixels).
    probs: list of (M, S, S) tensors on any device -> one bool (n_objects, S, S) numpy array per
    layout."""
    out = []
    for p, lay in zip(probs, layouts):
        n, S = len(lay["labels"]), p.shape[-1]
        inside = data.box_pixels(lay["boxes"].double().cpu().reshape(n, 4), S).numpy()   # (n, S, S)
        out.append((p[:n] > threshold).cpu().numpy() & inside)
    return out


def generate_layouts(model, diff, tok, layouts, size, steps=STEPS, sampler=SAMPLER, eta=0.0,
                     guidance=3.0,
                     batch=32, seed=0, dtype="fp32", progress=True, autoencoder=None,
                     attr_guidance=1.0,
                     mask_steps=0, mask_threshold=0.5):
    """Images (uint8 (S, S, 3) arrays) for a list of layouts dict(boxes, labels, difficulty), in
    batches. The noise stream depends only on `seed`, so the same layouts with other difficulty
    tokens start from the same x_T (the easy / hard comparison changes nothing but the prompt).
    mask_steps=k > 0: (images, masks), masks from `object_masks` over the last k sampling steps."""
    dev = next(model.parameters()).device
    g, null, out, probs = torch.Generator().manual_seed(seed), tok.null_prompt().to(dev), [], []
    for s in tqdm(range(0, len(layouts), batch), desc="batches", disable=not progress):
        chunk = layouts[s:s + batch]
        tokens = torch.stack([tok.encode(l["boxes"], l["labels"],
                                         l["difficulty"]) for l in chunk]).to(dev)
        x = generate(model, diff, tokens, null, size, steps, sampler, eta, guidance, g, dtype,
                     progress=False,
                     autoencoder=autoencoder, attr_guidance=attr_guidance, mask_steps=mask_steps)
        if mask_steps:
            x, m = x
            probs += list(m.cpu())
        out += [data.from_model_range(img) for img in x.cpu()]
    return (out, object_masks(probs, layouts, mask_threshold)) if mask_steps else out


MODES = ("origin", "easy", "hard")    # a layout with its own attributes, every object [easy], every
                                      # object [hard]


def with_difficulty(layouts, difficulty):
    """'origin' keeps each object's attribute; 'easy' / 'hard' give every object that token
    (docs/paper.md section 2)."""
    if difficulty == "origin":
        return layouts
    code = data.DIFFICULTY.index(difficulty)
    return [dict(lay, difficulty=torch.full_like(lay["labels"], code)) for lay in layouts]


if __name__ == "__main__":      # the command writes data sets (COCO, YOLO, masks): tooling, in
                                # data_sets/export.py
    from data_sets import export
    export.main()
