"""The generator's training loop (docs/paper.md sections 1 and 3): the layout-conditioned UNet
eps_theta(x_t, t, tokens) learns L = L_simple + lambda L_p, nanoGPT-style: the generator's settings
in `TrainConfig` (each field a flag of `python detdiff.py`), `train` = set_up / loop / end with
labelled phases, the run's state in one declared `Run`, checkpoints that carry their config,
`--resume`, bf16 autocast where the hardware has it, torch.compile and DDP as switches. One step
(`train_step`) reads four files: this one, diffusion.py (the schedule, q_sample, L_simple and its
weights, the condition dropout), unet.py (eps_theta and the perception head inside it) and
perception.py (L_p). The main job (detdiff.py) runs it as its `generator` stage; the ablations
(experiments/ablations.py) run it with one setting changed. The batches are data.py's, the optimiser
and the learning-rate schedule optim.py's.

    python detdiff.py --stage generator --steps 200 --out runs/quick      # this loop alone, on a run folder
    torchrun --nproc_per_node=2 detdiff.py --stage generator ...           # DDP (gloo on CPU, nccl on CUDA)
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import autoencoder
import config
import data
import diffusion
import optim
import perception
import sample
from unet import UNet, UNetConfig


# --------------------------------------------------------------------------------------------------
# Run settings (every field is a command-line flag of detdiff.py; --help lists them)


@dataclass
class TrainConfig:
    CHOICES: ClassVar[dict] = dict(dtype=config.DTYPES, schedule=("cosine", "linear"),
                                   sampler=sample.SAMPLERS,
                                   loss_weight=("minsnr", "none"), space=("pixel", "latent"),
                                   optimizer=("adamw", "muon"))
    RETIRED: ClassVar[dict] = dict(t_sampling="uniform", location="grid")   # config.from_saved
    ADDED: ClassVar[dict] = dict(optimizer="adamw", train_subset=1.0)   # what checkpoints made before
                                                                        # it trained with
    data: str = "shapes"             # data.resolve_data name or a COCO-format folder
    train_subset: float = 1.0        # fraction of the training images the generator trains on, the
                                     # first of a permutation seeded by --seed (ids in the
                                     # checkpoint's train_image_ids); < 1 makes a run for evaluate's
                                     # low-data trainability protocol
    out: str = ""                    # run folder; default runs/<data name>
    resume: bool = False
    steps: int = 0                   # optimizer-step cap (0 = none: the time budget alone decides)
    minutes: float = 14.5            # wall-clock budget of the whole main job (--stage all: the
                                     # generator trains what the other stages leave; --stage
                                     # generator: the generator's own); 0 = none, then --steps is
                                     # the run's length. The generator stops at whichever comes
                                     # first, its lr schedule follows the further along; --minutes 0
                                     # --steps N makes a run exactly reproducible
    batch_size: int = 32             # per process
    lr: float = 2e-3                 # docs/experiments.md has the study behind each default
    warmup: int = 100
    min_lr_frac: float = 0.1         # cosine decay to lr * min_lr_frac
    weight_decay: float = 0.01
    optimizer: str = "muon"          # muon | adamw. muon: Muon for the hidden weight matrices,
                                     # AdamW for the rest (optim.Muon; docs/experiments.md, "Muon")
    muon_lr_scale: float = 2.0       # muon: the Muon group's lr is lr times this
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    dtype: str = "auto"              # auto | fp32 | bf16 | fp16 (GradScaler only for fp16). auto:
                                     # bf16 autocast where the hardware has bf16 (a CUDA GPU that
                                     # supports it, a CPU with AVX-512 BF16 or AMX), else fp32; bf16
                                     # without it is many times slower (emulated)
    compile: bool = False
    seed: int = 0
    timesteps: int = 1000
    schedule: str = "cosine"         # cosine (Nichol & Dhariwal; the default, measured) | linear
                                     # (DDPM's, the paper's)
    p_uncond: float = 0.1            # GeoDiffusion: 10% of prompts become the null prompt
    p_uncond_attr: float = 0.2       # attribute-only dropout: this fraction of prompts get [none]
                                     # for every object's attribute (beyond the paper; trains
                                     # sample.py's --attr-guidance)
    fg_reweight: bool = True         # GeoDiffusion's foreground re-weighting of L_simple
                                     # (--no-fg-reweight: the paper's plain L_simple)
    loss_weight: str = "minsnr"      # weight of L_simple over timesteps: minsnr (Min-SNR-gamma) |
                                     # none (DDPM's L_simple, the paper's)
    snr_gamma: float = 5.0           # Min-SNR's gamma (Hang et al.: 5)
    pal_weight: float = 0.1          # lambda of L = L_simple + lambda L_p (docs/paper.md Eq. 8);
                                     # paper 0.01; 0 = no perception head
    attributes: str = "auto"         # auto: the run's attributes.json (pipeline stage) | none:
                                     # [none] tokens | a path
    image_size: int = 32
    space: str = "pixel"             # pixel | latent: the UNet learns the frozen autoencoder's
                                     # scaled latents (the paper's L_LDM; how to scale to 64 px and
                                     # up)
    autoencoder: str = "auto"        # latent: auto = the run's autoencoder.pt (the autoencoder
                                     # stage) | a path
    ae_steps: int = 1000   # autoencoder stage: optimizer steps (batch_size images each, lr, warmup)
    ae_factor: int = 4               # autoencoder: downsampling factor (64 px -> 16 x 16 latents)
    ae_channels: int = 16
    ae_latent_channels: int = 4
    ae_edge_weight: float = 0.0      # autoencoder loss: L1 + this x L1 of the image gradients (an
                                     # optional edge term; no downloaded perceptual network)
    bins: int = 32              # location bins per axis of the layout tokens (data.LayoutTokenizer)
    max_objects: int = 8
    min_area: float = 0.02
    log_every: int = 25
    sample_every: int = 250          # periodic sample grid (0 = only at the end)
    ckpt_every: int = 250            # periodic checkpoint (always one at the end)
    sampler: str = sample.SAMPLER    # sampler of the periodic grid and the main job's grid stage
                                     # (sample.SAMPLERS)
    sample_steps: int = 15           # its steps: fewer than sample.STEPS, to leave the generator
                                     # more of the main job's budget
                                     # (docs/experiments.md#the-main-job-in-15-minutes-on-a-cpu-without-bf16)
    guidance: float = 3.0            # classifier-free guidance scale of the periodic grid
    attr_guidance: float = -1.0      # w_d of the grid stage's attribute guidance
                                     # (sample.guided_eps; 1 = none); -1: ATTR_GUIDANCE when the run
                                     # trained with --p-uncond-attr, else 1
    n_grid: int = 8                  # validation layouts in the grid
    device: str = "auto"             # auto | cpu | cuda | cuda:N


# --------------------------------------------------------------------------------------------------
# The training loop


def train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, cfg, step):
    """One optimisation step of the generator on a batch (on the device): noise, forward, the loss
    L = L_simple + lambda L_p, backward, clipping, the optimiser, EMA. `model` is `raw` wrapped
    (DDP, compile) or `raw` itself. Returns the loss, L_simple and L_p (per image) as tensors.
    tools/bench.py times this function."""
    x0 = batch["image"]                                                             # (B, 3, S, S)
    tokens = batch["tokens"]
    if cfg.p_uncond_attr > 0:                                           # attributes alone -> [none]
        tokens = diffusion.drop_attributes(tokens, cfg.p_uncond_attr)
    tokens = diffusion.drop_condition(tokens, null, cfg.p_uncond)         # (B, L), 10% null prompts
    t = torch.randint(0, cfg.timesteps, (x0.shape[0],), device=x0.device)           # t ~ U{0..T-1}
    eps = torch.randn_like(x0)                                                      # eps ~ N(0, I)
    x_t = diff.q_sample(x0, t, eps)                                             # DDPM Eq. (4), fp32
    w_t = diffusion.timestep_weight(cfg, diff.alpha_bar[t])           # Min-SNR (B, 1, 1, 1) or None
    weight = diffusion.foreground_weight(batch["boxes"], batch["valid"],
                                         x0.shape[-1]) if cfg.fg_reweight else None
    weight = w_t if weight is None else weight if w_t is None else weight * w_t
    # forward under autocast (the losses in fp32)
    with amp:
        if cfg.pal_weight > 0:
            eps_pred, aux = model(x_t, t, tokens, return_features=True)
        else:
            eps_pred = model(x_t, t, tokens)
    l_simple = diffusion.loss_simple(eps_pred, eps, weight)                # DDPM Eq. (14), weighted
    if cfg.pal_weight > 0:                                         # dropped prompts have no objects
        valid = batch["valid"] & aux["object_valid"]                                # (B, M)
        l_p = perception.perception_loss(aux["mask_logits"], batch["masks"], valid,
                                         diff.alpha_bar[t])           # sqrt(alpha_bar_t)(L_m + L_d)
        loss = l_simple + cfg.pal_weight * l_p.mean()                    # L = L_simple + lambda L_p
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


def ema_update(ema, model, decay):
    """EMA of the weights: theta_ema <- decay * theta_ema + (1 - decay) * theta; buffers are
    copied."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def run_folder(cfg):
    """The run folder: --out, or runs/<data set name> (the one place its default is decided)."""
    return Path(cfg.out or Path("runs") / Path(cfg.data).name)


@dataclass
class Run:
    """All a generator run holds while it trains: made by `set_up`, advanced by `loop`, closed by
    `end`."""
    cfg: TrainConfig
    pipeline_cfg: dict          # the main job's other settings, kept in the checkpoint for evaluate
    # processes and device (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
    ddp: bool = False
    rank: int = 0
    world: int = 1
    master: bool = True                    # rank 0 writes the run folder
    device: torch.device = None
    dtype: str = "fp32"                    # resolved: fp32 | bf16 | fp16
    # the run folder
    out: Path = None
    ckpt_path: Path = None
    log: config.RunLog = None
    # data (set_up_data)
    tok: data.LayoutTokenizer = None
    category_ids: list = None
    train_size: int = 0
    train_image_ids: list = None           # the image ids the generator trains on (--train-subset)
    attr_path: Path = None         # the attribute sidecar the run trains with (None: [none] tokens)
    decoded: data.DecodedLayouts = None    # the train split, decoded once: batches by indexing
    val_batch: dict = None                 # the periodic grid's val layouts and real images
    null: torch.Tensor = None              # the null prompt (L,), on the device
    ae: object = None          # latent space: the frozen autoencoder, its path and fingerprint, and
    ae_info: dict = None                   # every training image's scaled latent (N, c, S/f, S/f)
    latents: torch.Tensor = None
    # model and optimisation (set_up_model)
    mcfg: UNetConfig = None
    raw: nn.Module = None            # the UNet itself; `model` is it wrapped in DDP / torch.compile
    model: nn.Module = None
    ema: nn.Module = None
    diff: diffusion.Diffusion = None
    opt: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None
    amp: object = None                     # the forward's autocast context
    # progress (loop)
    step: int = 0
    history: dict = field(default_factory=lambda: dict(step=[], loss=[], l_simple=[], l_p=[]))
    elapsed_before: float = 0.0            # seconds trained before a resume
    t0: float = 0.0                        # when the run started, resumes counted
    t_start: float = 0.0                   # when this process's loop started (images/s)
    seen: int = 0                          # images this process's loop trained on, all ranks
    pending: list = field(default_factory=list)   # (loss, L_simple, L_p) of steps not read back yet


def train(cfg, mcfg_overrides=None, interrupt_at=None, pipeline_cfg=None):
    """Train a generator with settings `cfg` (TrainConfig): set-up, the loop, the end. The
    checkpoint keeps `pipeline_cfg` (the main job's other settings) for evaluate. `interrupt_at`
    (tests only) acts as if the process were killed right after that step. Returns the unwrapped
    model; rank 0 writes the run folder."""
    run = set_up(cfg, mcfg_overrides, pipeline_cfg)
    if loop(run, interrupt_at):
        end(run)
    return run.raw


def check_sizes(cfg, mcfg_overrides=None):
    """The image side of a run (TrainConfig) against the UNet's downsampling (and, in latent mode,
    the autoencoder's factor), before any stage runs: a one-line DataError naming the flags, instead
    of a traceback when the generator stage starts; --train-subset's range with them."""
    if not 0 < cfg.train_subset <= 1:
        raise config.DataError(f"--train-subset must be in (0, 1], got {cfg.train_subset}")
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
        raise config.DataError(f"{what} is not divisible by {down}, the UNet's downsampling "
                               f"(--channel-mults {','.join(map(str, mults))}: one halving per "
                               f"level after the first)")


def set_up(cfg, mcfg_overrides=None, pipeline_cfg=None):
    """Processes and device, the run folder (never silently overwritten), data, model, EMA and
    optimiser."""
    r = Run(cfg, pipeline_cfg or {})
    # -- processes and device: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    r.ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    local = 0
    if r.ddp:
        r.rank, r.world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    config.check_choices(cfg)
    # auto: cuda, then mps, then cpu
    r.device, device_why = config.resolve_device(cfg.device, local)
    if not cfg.resume:                            # a resumed run keeps its checkpoint's shapes
        check_sizes(cfg, mcfg_overrides)
    if cfg.steps <= 0 and cfg.minutes <= 0:
        raise config.DataError("--minutes 0 needs --steps N > 0 (a run needs a time budget or a "
                               "step count)")
    if r.ddp:
        if r.device.type == "cuda":
            torch.cuda.set_device(r.device)
        dist.init_process_group("nccl" if r.device.type == "cuda" else "gloo")
    r.master = r.rank == 0
    r.dtype, dtype_why = config.resolve_dtype(cfg.dtype, r.device)
    r.out = run_folder(cfg)
    r.ckpt_path, ck = r.out / "ckpt.pt", None
    if cfg.resume:
        if not r.ckpt_path.is_file():
            raise config.DataError(f"{r.ckpt_path}: no checkpoint to resume from")
        ck = config.load_file(r.ckpt_path)
    elif r.ckpt_path.exists():
        raise config.DataError(f"{r.out} already holds a run (ckpt.pt); pass --resume to continue "
                               f"it or --out for a new folder")
    if r.ddp:
        dist.barrier()                # every rank has checked the folder before rank 0 writes to it
    if r.master:
        r.out.mkdir(parents=True, exist_ok=True)
    r.log = config.RunLog(r.out / "log.txt", enabled=r.master)
    set_up_data(r, ck)
    set_up_model(r, ck, mcfg_overrides)
    if r.master and not ck:
        (r.out / "config.json").write_text(json.dumps(dict(train=asdict(cfg), model=asdict(r.mcfg)),
                                                      indent=1))
        r.log(f"{sum(p.numel() for p in r.raw.parameters()) / 1e6:.2f}M parameters, {r.train_size} "
              f"train images, {r.world} process(es) on {r.device} ({device_why}), dtype {r.dtype} "
              f"({dtype_why}), run folder {r.out}")
    return r


def set_up_data(r, ck):
    """Seeds, tokenizer, attributes, the train split (--train-subset's images of it, decoded once
    into tensors, data.DecodedLayouts), the grid's val batch and, in latent space, the frozen
    autoencoder (the one a resumed run learned with) and every image's latent."""
    cfg = r.cfg
    torch.manual_seed(cfg.seed + r.rank)
    random.seed(cfg.seed + r.rank)
    np.random.seed(cfg.seed + r.rank)
    root = data.resolve_data(cfg.data)
    keep = dict(size=cfg.image_size, min_area=cfg.min_area, max_objects=cfg.max_objects)
    probe = data.CocoLayoutDataset(root, "train", **keep)
    r.tok = tok = data.LayoutTokenizer(probe.class_names, bins=cfg.bins,
                                       max_objects=cfg.max_objects)
    r.category_ids = probe.category_ids
    r.attr_path = perception.attributes_path(cfg, r.out)   # each object's perception-aware
                                                           # attribute (section 2)
    attrs = {sp: perception.load_attributes(r.attr_path,
                                            sp) if r.attr_path else None for sp in ("train", "val")}
    r.log(f"attributes: {r.attr_path}" if r.attr_path else "attributes: none (every object gets "
                                                           "the [none] token)")
    train_ds = data.CocoLayoutDataset(root, "train", shuffle_objects=True, tokenizer=tok,
                                      attributes=attrs["train"],
                                      **keep)
    val_ds = data.CocoLayoutDataset(root, "val", tokenizer=tok, attributes=attrs["val"], **keep)
    keep_training_subset(r, train_ds, ck)
    r.train_size = len(train_ds)
    r.val_batch = data.collate([val_ds[i] for i in range(min(cfg.n_grid, len(val_ds)))],
                               cfg.max_objects)
    r.null = tok.null_prompt().to(r.device)
    if cfg.space == "latent":
        ae_path = autoencoder.autoencoder_path(cfg, r.out)
        ae, fp = autoencoder.load_autoencoder(ae_path,
                                              ck["autoencoder"]["fingerprint"] if ck else None,
                                              r.ckpt_path)
        r.ae, r.ae_info = ae.to(r.device), dict(path=str(ae_path), fingerprint=fp)
        # (N, c, S/f, S/f)
        r.latents = autoencoder.encode_dataset(r.ae, train_ds, r.device, progress=r.master)
        r.log(f"latent space: {ae_path} ({fp}) encodes {cfg.image_size}px images as "
              f"{tuple(r.latents.shape[1:])} latents")
    r.decoded = data.DecodedLayouts(train_ds, r.device, images=r.latents is None, progress=r.master)
    r.log(f"data: {len(r.decoded)} training images decoded once, {r.decoded.nbytes / 1e6:.0f} MB "
          f"kept on {r.decoded.store}")


def training_subset(n, fraction, seed):
    """Positions of the training images a run with --train-subset `fraction` trains on: the first
    round(fraction n) (at least 1) of a permutation seeded by the run's seed, in split order; all n
    at 1."""
    if fraction >= 1:
        return list(range(n))
    k = max(1, round(fraction * n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def keep_training_subset(r, train_ds, ck):
    """Cut the train split down to --train-subset's images, in place (before anything is decoded or
    encoded, so that the loop can index no other image), and record their ids. A resumed run must
    find the ids its checkpoint recorded: the subset is what evaluate's low-data protocol trusts."""
    n = len(train_ds)
    pos = training_subset(n, r.cfg.train_subset, r.cfg.seed)
    train_ds.keep_only(pos)
    r.train_image_ids = [int(rec["image_id"]) for rec in train_ds.records]
    if ck and ck.get("train_image_ids") is not None and ck["train_image_ids"] != r.train_image_ids:
        raise config.DataError(f"{r.ckpt_path}: the run trained on other training images than "
                               f"--train-subset {r.cfg.train_subset} picks now (was the data set "
                               f"changed?)")
    if len(pos) < n:
        r.log(f"--train-subset {r.cfg.train_subset}: the generator trains on {len(pos)} of the {n} "
              f"training images (ids in the checkpoint's train_image_ids)")


def model_config(cfg, tok, mcfg_overrides=None, latent_channels=None):
    """The UNet's shape for a new run: the tokenizer's layout, no mask head without the perception
    loss, the autoencoder's channels in latent space, then the model flags given
    (mcfg_overrides)."""
    overrides = dict(dict(mask_dim=0) if cfg.pal_weight == 0 else {}, **(mcfg_overrides or {}))
    if latent_channels:
        overrides["in_channels"] = latent_channels
    return UNetConfig.for_tokenizer(tok, **overrides)


def set_up_model(r, ck, mcfg_overrides):
    """UNet, EMA, schedule, the optimizer (--optimizer) and GradScaler (the checkpoint's shapes and
    states win on resume), wrapped in DDP and torch.compile when asked."""
    cfg = r.cfg
    saved_opt = config.from_saved(TrainConfig, ck["train_cfg"]).optimizer if ck else cfg.optimizer
    if saved_opt != cfg.optimizer:       # its state would not load into the other optimiser
        raise config.DataError(f"--optimizer {cfg.optimizer}: the checkpoint was trained with "
                               f"{saved_opt}; resume with --optimizer {saved_opt}")
    r.mcfg = config.from_saved(UNetConfig, ck["model_cfg"]) if ck else \
        model_config(cfg, r.tok, mcfg_overrides,
                     r.ae.cfg.latent_channels if r.ae is not None else None)
    if cfg.pal_weight > 0 and not r.mcfg.mask_dim:
        raise config.DataError("--pal-weight > 0 needs the perception head (--mask-dim > 0)")
    r.raw = UNet(r.mcfg, loc_xy=r.tok.location_xy()).to(r.device)
    r.ema = copy.deepcopy(r.raw).eval().requires_grad_(False)
    r.diff = diffusion.Diffusion(cfg.timesteps, cfg.schedule).to(r.device)
    r.opt = optim.make_optimizer(r.raw, cfg, dtype=r.dtype)
    r.scaler = torch.amp.GradScaler(r.device.type, enabled=r.dtype == "fp16")
    if ck:
        r.raw.load_state_dict(ck["model"])
        r.ema.load_state_dict(ck["ema"])
        r.opt.load_state_dict(ck["opt"])
        r.scaler.load_state_dict(ck["scaler"])
        r.step, r.history, r.elapsed_before = ck["step"], ck["history"], ck["elapsed"]
        optim.set_rng_state(ck["rng"][r.rank] if r.rank < len(ck["rng"]) else ck["rng"][0])
        r.log(f"resumed {r.ckpt_path} at step {r.step}")
    r.model = r.raw
    if r.ddp:
        r.model = nn.parallel.DistributedDataParallel(r.raw,
                                                      device_ids=[r.device.index] if r.device.type == "cuda"
                                                      else None)
    if cfg.compile:
        r.model = torch.compile(r.model)
    r.amp = config.autocast(r.device, r.dtype)


def checkpoint(r, finished=False):
    """Every rank's RNG state, and on rank 0 the checkpoint with everything needed to resume or
    sample."""
    states = [None] * r.world
    if r.ddp:
        dist.all_gather_object(states, optim.rng_state())
    else:
        states = [optim.rng_state()]
    if r.master:
        tok = r.tok
        config.atomic_save(dict(model=r.raw.state_dict(), ema=r.ema.state_dict(),
                                opt=r.opt.state_dict(),
                                scaler=r.scaler.state_dict(), step=r.step, rng=states,
                                history=r.history,
                                elapsed=time.time() - r.t0, finished=finished,
                                train_cfg=asdict(r.cfg), model_cfg=asdict(r.mcfg),
                                pipeline_cfg=r.pipeline_cfg, train_image_ids=r.train_image_ids,
                                img_s=r.seen / max(time.time() - r.t_start, 1e-9),
                                attributes_used=str(r.attr_path) if r.attr_path else "",
                                space=r.cfg.space,
                                dtype=r.dtype, autoencoder=r.ae_info,
                                tokenizer=dict(class_names=tok.class_names,
                                               category_ids=r.category_ids,
                                               bins=tok.bins, max_objects=tok.max_objects)),
                           r.ckpt_path)


def outputs(r):
    """Rank 0: real val images (left) beside generated ones for the same layouts (right), boxes
    drawn, in samples_STEP.png (its own random generator: the training stream is untouched)."""
    if not r.master:
        return
    b, tok = r.val_batch, r.tok
    x = sample.generate(r.ema, r.diff, b["tokens"].to(r.device), r.null, size=r.cfg.image_size,
                        steps=r.cfg.sample_steps, sampler=r.cfg.sampler, guidance=r.cfg.guidance,
                        generator=torch.Generator().manual_seed(1234),
                        dtype=config.sampling_dtype(r.dtype, r.device), progress=False,
                        autoencoder=r.ae)
    tiles = [data.draw_layout(data.from_model_range(im), boxes[v], labels[v], tok.class_names)
             for real, fake, boxes, labels,
             v in zip(b["image"], x.cpu(), b["boxes"], b["labels"], b["valid"])
             for im in (real, fake)]
    data.image_grid(tiles, ncol=4).save(r.out / f"samples_{r.step:06d}.png")


def read_losses(r):
    """Read the pending steps' losses back at once (averaged over processes, so every rank takes the
    same decision), append them to the history, and stop on a non-finite one."""
    if not r.pending:
        return None
    lv = torch.stack(r.pending)                   # (k, 3)
    r.pending.clear()
    if r.ddp:
        dist.all_reduce(lv)
        lv /= r.world
    rows = lv.tolist()
    for k, (l, ls, lp) in enumerate(rows, start=r.step - len(rows) + 1):
        if not math.isfinite(l):
            r.log(f"error: non-finite loss ({l}) at step {k}; stopping (last good checkpoint: "
                  f"{r.ckpt_path})")
            raise FloatingPointError(f"non-finite loss ({l}) at step {k}")
        r.history["step"].append(k)
        r.history["loss"].append(l)
        r.history["l_simple"].append(ls)
        if r.cfg.pal_weight > 0:
            r.history["l_p"].append(lp)
    return rows[-1]


def loop(r, interrupt_at=None):
    """The training loop until the step cap or the time budget, whichever comes first; one host sync
    per log line. False when `interrupt_at` stopped it (as if the process had been killed)."""
    cfg = r.cfg
    # pending: unread (loss, L_simple, L_p)
    r.t0, r.seen, r.pending = time.time() - r.elapsed_before, 0, []
    # the progress bar counts steps when a step cap is the run's length, else the seconds of the
    # time budget
    by_time = cfg.minutes > 0 and cfg.steps <= 0
    bar = tqdm(total=round(60 * cfg.minutes) if by_time else cfg.steps,
               initial=round(time.time() - r.t0)
               if by_time else r.step, unit="s" if by_time else "it", disable=not r.master,
               dynamic_ncols=True)
    r.raw.train()
    r.t_start = time.time()                 # for images/s (t0 also counts the time before a resume)
    while cfg.steps <= 0 or r.step < cfg.steps:
        elapsed = time.time() - r.t0
        if r.ddp and cfg.minutes > 0:      # every rank uses rank 0's clock: same lr, same stop step
            clock = torch.tensor([elapsed], device=r.device)    # on the device for nccl; float32:
                                                                # ms over hours
            dist.broadcast(clock, 0)
            elapsed = clock.item()
        if cfg.minutes > 0 and elapsed > 60 * cfg.minutes:
            r.log(f"time budget of {cfg.minutes} minutes reached at step {r.step}")
            break
        progress = max(r.step / cfg.steps if cfg.steps > 0 else 0.0,
                       elapsed / (60 * cfg.minutes) if cfg.minutes > 0 else 0.0)
        # lr for this step
        lr = optim.lr_at(cfg, r.step, progress)
        for g in r.opt.param_groups:
            g["lr"] = lr
        # batch: the layouts' images, tokens, boxes and masks; then one step (train_step: the
        # paper's loss)
        idx = optim.batch_indices(r.train_size, cfg.batch_size, r.step, cfg.seed, r.rank, r.world)
        batch = r.decoded.batch(idx)  # tokens with the objects shuffled, boxes, masks, valid, image
        if r.latents is not None:           # latent space: x_0 is the image's scaled latent (L_LDM)
            batch["image"] = r.latents[torch.as_tensor(idx, device=r.latents.device)]
        loss, l_simple, l_p = train_step(r.model, r.raw, r.ema, r.opt, r.scaler, r.diff, r.amp,
                                         batch, r.null, cfg,
                                         r.step)
        r.step += 1
        r.seen += len(idx) * r.world
        r.pending.append(torch.stack([loss.detach().float(), l_simple.detach().float(),
                                      l_p.detach().float().mean()]))
        bar.update(min(round(time.time() - r.t0), bar.total) - bar.n if by_time else 1)
        # log line: the losses read back from the device (every rank, before anything that reads the
        # history)
        sample_now = cfg.sample_every and r.step % cfg.sample_every == 0
        ckpt_now = cfg.ckpt_every and r.step % cfg.ckpt_every == 0
        if r.step % cfg.log_every == 0 or sample_now or ckpt_now:
            lv, ls, lp = read_losses(r)
            ips = r.seen / max(time.time() - r.t_start, 1e-9)
            bar.set_postfix(step=r.step, loss=f"{lv:.4f}", L_p=f"{lp:.3f}", img_s=f"{ips:.1f}")
            if r.step % cfg.log_every == 0:
                r.log(f"step {r.step} loss {lv:.4f} (L_simple {ls:.4f} L_p {lp:.4f}) lr {lr:.2e} "
                      f"{ips:.1f} img/s {time.time() - r.t0:.0f}s")
        # periodic sample grid and checkpoint
        if sample_now:
            outputs(r)
        if ckpt_now:
            checkpoint(r)
        if interrupt_at is not None and r.step >= interrupt_at:
            bar.close()
            return False
    bar.close()
    return True


def end(r):
    """The final checkpoint (marked finished) and sample grid."""
    read_losses(r)
    checkpoint(r, finished=True)
    if not (r.cfg.sample_every and r.step % r.cfg.sample_every == 0):
        outputs(r)
    r.log(f"done: step {r.step}, {time.time() - r.t0:.0f}s, "
          f"{r.seen / max(time.time() - r.t_start, 1e-9):.1f} img/s; checkpoint {r.ckpt_path}")
    r.log.close()
    if r.ddp:
        dist.barrier()
        dist.destroy_process_group()
