"""The generator's training loop (PAPER.md sections 1 and 3): the layout-conditioned UNet eps_theta(x_t, t, tokens)
learns L = L_simple + lambda L_p, nanoGPT-style: every run setting in `TrainConfig` (each field a flag of
`python detdiff.py`), a flat loop with labelled phases, checkpoints that carry their config, `--resume`, bf16
autocast where the hardware has it, torch.compile and DDP as switches.

The main job (detdiff.py) runs it as its `generator` stage; evaluate.py's ablations run it with one setting
changed. The schedule, L_simple and the condition dropout are diffusion.py's, L_p is perception.py's, the
optimisation pieces optim.py's.

    python detdiff.py --stage generator --steps 200 --out runs/quick      # this loop alone, on a run folder
    torchrun --nproc_per_node=2 detdiff.py --stage generator ...           # DDP (gloo on CPU, nccl on CUDA)
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import autoencoder
import batches
import config
import data
import diffusion
import figures
import optim
import perception
import sample
from unet import UNet, UNetConfig


# ----------------------------------------------------------------------------------------------------------------
# Run settings (every field is a command-line flag of detdiff.py; --help lists them)


@dataclass
class TrainConfig:
    CHOICES: ClassVar[dict] = dict(dtype=config.DTYPES, schedule=("cosine", "linear"),
                                   loss_weight=("minsnr", "none"), space=("pixel", "latent"), location=("grid", "axis"),
                                   stage=("all", "data", "detector", "attributes", "autoencoder", "generator", "grid"))
    data: str = "shapes"             # data.resolve_data name or a COCO-format folder
    out: str = ""                    # run folder; default runs/<data name>
    resume: bool = False
    steps: int = 0                   # optimizer-step cap (0 = none: the time budget alone decides)
    minutes: float = 11.0            # wall-clock budget (0 = none, then --steps is the run's length): stop at
                                     # whichever comes first, the lr schedule follows the further along; --minutes 0
                                     # --steps N makes a run exactly reproducible
    batch_size: int = 32             # per process
    lr: float = 2e-3                 # the generator study: 2e-3 beat 1e-3 and 4e-3 at 9 minutes
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
                                     # attribute (beyond the paper; trains sample.py's --attr-guidance)
    fg_reweight: bool = True         # GeoDiffusion's foreground re-weighting of L_simple (the generator study: on;
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


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the loop


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


def check_sizes(cfg, mcfg_overrides=None):
    """The image side against the UNet's downsampling (and, in latent mode, the autoencoder's factor), before any
    stage runs: a one-line DataError naming the flags, instead of a traceback when the generator stage starts."""
    mults = (mcfg_overrides or {}).get("channel_mults", UNetConfig.channel_mults)
    down, S, what = 2 ** (len(mults) - 1), cfg.image_size, f"--image-size {cfg.image_size}"
    if cfg.space == "latent":
        f = cfg.ae_factor
        if f < 1 or f & (f - 1):
            raise config.DataError(f"--ae-factor {f}: must be a power of 2")
        if S % f:
            raise config.DataError(f"--image-size {S}: not divisible by --ae-factor {f}")
        S, what = S // f, f"the latent side {S // f} (--image-size {S} / --ae-factor {f})"
    if S % down:
        raise config.DataError(f"{what} is not divisible by {down}, the UNet's downsampling (--channel-mults "
                               f"{','.join(map(str, mults))}: one halving per level after the first)")


def save_grid(ema, diff, tok, val_batch, cfg, path, device, autoencoder=None, dtype="fp32"):
    """Real validation images (left) beside generated ones for the same layouts (right), boxes drawn."""
    g = torch.Generator(device="cpu").manual_seed(1234)    # own generator: the training RNG stream is untouched
    x = sample.generate(ema, diff, val_batch["tokens"].to(device), tok.null_prompt().to(device),
                        size=cfg.image_size, steps=cfg.sample_steps, guidance=cfg.guidance, generator=g,
                        dtype=config.sampling_dtype(dtype, device), progress=False,
                        autoencoder=autoencoder)
    tiles = []
    for real, fake, boxes, labels, valid in zip(val_batch["image"], x.cpu(), val_batch["boxes"],
                                                val_batch["labels"], val_batch["valid"]):
        for im in (real, fake):
            tiles.append(figures.draw_layout(data.from_model_range(im), boxes[valid], labels[valid], tok.class_names))
    figures.image_grid(tiles, ncol=4).save(path)


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, cfg, step):
    """One optimisation step of the generator on a collated batch (on the device): noise, forward, the loss
    L = L_simple + lambda L_p, backward, clipping, AdamW, EMA. `model` is `raw` wrapped (DDP, compile) or `raw`
    itself. Returns the loss, L_simple and L_p (per image) as tensors. bench.py times this same function."""
    x0 = batch["image"]                                                             # (B, 3, S, S)
    tokens = batch["tokens"]
    if cfg.p_uncond_attr > 0:                                                       # attributes alone -> [none]
        tokens = diffusion.drop_attributes(tokens, cfg.p_uncond_attr)
    tokens = diffusion.drop_condition(tokens, null, cfg.p_uncond)                   # (B, L), 10% null prompts
    t = torch.randint(0, cfg.timesteps, (x0.shape[0],), device=x0.device)           # t ~ U{0..T-1}
    eps = torch.randn_like(x0)                                                      # eps ~ N(0, I)
    x_t = diff.q_sample(x0, t, eps)                                                 # DDPM Eq. (4), fp32
    weight = diffusion.foreground_weight(batch["boxes"], batch["valid"], x0.shape[-1]) if cfg.fg_reweight else None
    w_t = diffusion.timestep_weight(cfg, diff.alpha_bar[t])                         # (B, 1, 1, 1) or None
    weight = w_t if weight is None else weight if w_t is None else weight * w_t
    # forward under autocast (the losses in fp32)
    with amp:
        if cfg.pal_weight > 0:
            eps_pred, aux = model(x_t, t, tokens, return_features=True)
        else:
            eps_pred = model(x_t, t, tokens)
    l_simple = diffusion.loss_simple(eps_pred, eps, weight)                         # DDPM Eq. (14), weighted
    if cfg.pal_weight > 0:                                                          # dropped prompts have no objects
        valid = batch["valid"] & aux["object_valid"]                                # (B, M)
        l_p = perception.perception_loss(aux["mask_logits"], batch["masks"], valid,
                                         diff.alpha_bar[t])                         # sqrt(alpha_bar_t)(L_m + L_d)
        loss = l_simple + cfg.pal_weight * l_p.mean()                               # L = L_simple + lambda L_p
    else:
        l_p, loss = torch.zeros((), device=x0.device), l_simple
    # backward, clip, optimizer step, EMA update
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    optim.ema_update(ema, raw, min(cfg.ema_decay, (1 + step) / (10 + step)))
    return loss, l_simple, l_p


def train(cfg, mcfg_overrides=None, interrupt_at=None):
    """Train a generator with settings `cfg` (TrainConfig). `interrupt_at` (tests only) behaves as if the
    process were killed right after that step. Returns the unwrapped model (rank 0 writes the run folder)."""
    # -- processes and device: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])) \
        if ddp else (0, 1, 0)
    device, device_why = config.resolve_device(cfg.device, local)      # auto: cuda, then mps, then cpu
    if not cfg.resume:                            # a resumed run keeps its checkpoint's shapes
        check_sizes(cfg, mcfg_overrides)
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    dtype, dtype_why = config.resolve_dtype(cfg.dtype, device)
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
        ck = config.load_file(ckpt_path)
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
        ae_path = autoencoder.autoencoder_path(cfg, out)
        ae, fp = autoencoder.load_autoencoder(ae_path, ck["autoencoder"]["fingerprint"] if ck else None, ckpt_path)
        ae, ae_info = ae.to(device), dict(path=str(ae_path), fingerprint=fp)
        latents = autoencoder.encode_dataset(ae, train_ds, device, progress=master)            # (N, c, S/f, S/f)
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
    diff = diffusion.Diffusion(cfg.timesteps, cfg.schedule).to(device)
    opt = optim.make_optimizer(raw, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    step, history = 0, dict(step=[], loss=[], l_simple=[], l_p=[])
    if ck:
        raw.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        step, history = ck["step"], ck["history"]
        optim.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        log(f"resumed {ckpt_path} at step {step}")
    model = raw
    if ddp:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[local] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    amp = config.autocast(device, dtype)
    if master and not ck:
        (out / "config.json").write_text(json.dumps(dict(train=asdict(cfg), model=asdict(mcfg)), indent=1))
        log(f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, {len(train_ds)} train images, "
            f"{world} process(es) on {device} ({device_why}), dtype {dtype} ({dtype_why}), run folder {out}")

    def checkpoint():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, optim.rng_state())
        else:
            states = [optim.rng_state()]
        if master:
            config.atomic_save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                    scaler=scaler.state_dict(), step=step, rng=states, history=history,
                                    elapsed=time.time() - t0, finished=finished,
                                    train_cfg=asdict(cfg), model_cfg=asdict(mcfg),
                                    img_s=seen / max(time.time() - t_start, 1e-9),
                                    attributes_used=str(attr_path) if attr_path else "", space=cfg.space, dtype=dtype,
                                    autoencoder=ae_info,
                                    tokenizer=dict(class_names=tok.class_names, category_ids=probe.category_ids,
                                                   bins=tok.bins, max_objects=tok.max_objects, location=tok.location)),
                               ckpt_path)

    def periodic_outputs():
        if master:
            save_grid(ema, diff, tok, val_batch, cfg, out / f"samples_{step:06d}.png", device, ae, dtype)
            curves = {k: (history["step"], history[k]) for k in ("loss", "l_simple", "l_p") if history.get(k)}
            figures.loss_curve(curves, out / "loss.png", f"{out.name}: training loss (log scale)")

    # -- the loop: the training split decoded once into tensors on the device (batches.py), one host sync per log line
    finished = False
    t0, seen = time.time() - (ck["elapsed"] if ck else 0.0), 0
    decoded = batches.DecodedLayouts(train_ds, device, images=latents is None, progress=master)
    log(f"data: {len(decoded)} training images decoded once, {decoded.nbytes / 1e6:.0f} MB kept on {decoded.store}")
    pending = []                                  # (loss, L_simple, L_p) of the steps not yet read back, on the device

    def read_losses():
        """Read the pending steps' losses back at once (averaged over processes, so every rank takes the same
        decision), append them to the history, and stop on a non-finite one."""
        if not pending:
            return None
        lv = torch.stack(pending)                 # (k, 3)
        pending.clear()
        if ddp:
            dist.all_reduce(lv)
            lv /= world
        rows = lv.tolist()
        for k, (l, ls, lp) in enumerate(rows, start=step - len(rows) + 1):
            if not math.isfinite(l):
                log(f"error: non-finite loss ({l}) at step {k}; stopping (last good checkpoint: {ckpt_path})")
                raise SystemExit(f"error: non-finite loss ({l}) at step {k}")
            history["step"].append(k)
            history["loss"].append(l)
            history["l_simple"].append(ls)
            if cfg.pal_weight > 0:
                history["l_p"].append(lp)
        return rows[-1]

    # the progress bar counts steps when a step cap is the run's length, else the seconds of the time budget
    by_time = cfg.minutes > 0 and cfg.steps <= 0
    bar = tqdm(total=round(60 * cfg.minutes) if by_time else cfg.steps, initial=round(time.time() - t0) if by_time
               else step, unit="s" if by_time else "it", disable=not master, dynamic_ncols=True)
    raw.train()
    t_start = time.time()                         # for images/s (t0 also counts the time before a resume)
    while cfg.steps <= 0 or step < cfg.steps:
        elapsed = time.time() - t0
        if ddp and cfg.minutes > 0:               # every rank uses rank 0's clock: same lr, same stop step
            clock = torch.tensor([elapsed], device=device)    # on the device for nccl; float32: ms over hours
            dist.broadcast(clock, 0)
            elapsed = clock.item()
        if cfg.minutes > 0 and elapsed > 60 * cfg.minutes:
            log(f"time budget of {cfg.minutes} minutes reached at step {step}")
            break
        progress = max(step / cfg.steps if cfg.steps > 0 else 0.0,
                       elapsed / (60 * cfg.minutes) if cfg.minutes > 0 else 0.0)
        # lr for this step
        lr = optim.lr_at(cfg, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        # batch: the layouts' images, tokens, boxes and masks; then one step (train_step: the paper's loss)
        idx = optim.batch_indices(len(train_ds), cfg.batch_size, step, cfg.seed, rank, world)
        batch = decoded.batch(idx)                # tokens with the objects shuffled, boxes, masks, valid, image
        if latents is not None:                   # latent space: x_0 is the image's scaled latent (L_LDM)
            batch["image"] = latents[torch.as_tensor(idx, device=latents.device)]
        loss, l_simple, l_p = train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, cfg, step)
        step += 1
        seen += len(idx) * world
        pending.append(torch.stack([loss.detach().float(), l_simple.detach().float(), l_p.detach().float().mean()]))
        bar.update(min(round(time.time() - t0), bar.total) - bar.n if by_time else 1)
        # log line: the losses read back from the device (every rank, before anything that reads the history)
        sample_now = cfg.sample_every and step % cfg.sample_every == 0
        ckpt_now = cfg.ckpt_every and step % cfg.ckpt_every == 0
        if step % cfg.log_every == 0 or sample_now or ckpt_now:
            lv, ls, lp = read_losses()
            ips = seen / max(time.time() - t_start, 1e-9)
            bar.set_postfix(step=step, loss=f"{lv:.4f}", L_p=f"{lp:.3f}", img_s=f"{ips:.1f}")
            if step % cfg.log_every == 0:
                log(f"step {step} loss {lv:.4f} (L_simple {ls:.4f} L_p {lp:.4f}) lr {lr:.2e} {ips:.1f} img/s "
                    f"{time.time() - t0:.0f}s")
        # periodic sample grid and checkpoint
        if sample_now:
            periodic_outputs()
        if ckpt_now:
            checkpoint()
        if interrupt_at is not None and step >= interrupt_at:
            bar.close()
            return raw
    bar.close()
    # -- end: final checkpoint, grid and loss curve
    read_losses()
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
