"""Latent mode (`--space latent`): the frozen autoencoder the UNet learns in, as the paper's Stable
Diffusion backbone does (docs/paper.md section 1: L_LDM = L_simple on the autoencoder's scaled latents z
= scale * E(x)).

Trained by the main job's `autoencoder` stage (`train_autoencoder`: L1 reconstruction of the real
training images, then the latent scale 1 / std(E(x))), then frozen: the generator's checkpoint
records its fingerprint, and a latent checkpoint is only ever sampled with the autoencoder it
learned with (`load_autoencoder`, `checkpoint_autoencoder`).

    python detdiff.py --space latent --image-size 64            # the main job with the autoencoder stage
    python detdiff.py --space latent --stage autoencoder --out runs/latent   # the stage alone
"""
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

import config
import data
import optim
from config import DataError
from unet import ResBlock, norm

KIND = "detdiff-autoencoder"       # config.save_module's kind of autoencoder.pt


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    channels: int = 16                   # width at full resolution; x2 at every halving
    latent_channels: int = 4             # Stable Diffusion's 4
    factor: int = 4                      # downsampling factor, a power of 2 (SD: 8)


class Autoencoder(nn.Module):
    """x (B, 3, S, S) in [-1, 1] <-> z (B, c, S/f, S/f). A plain (deterministic) convolutional
    autoencoder with a latent scale factor, where Stable Diffusion's is KL-regularised: SD's KL
    weight (1e-6) leaves its posterior all but deterministic and the diffusion model only ever sees
    the posterior mean times a scale (0.18215) that gives the latents unit variance; here that
    scale, `scale = 1 / std(E(x))` over training images, is measured after training
    (`train_autoencoder`). `encode` returns scaled latents and `decode` takes them, so the diffusion
    code sees unit-variance x_0 in latent space as it sees [-1, 1] images in pixel space. L_LDM
    (docs/paper.md section 1) is L_simple on these z."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg, n = cfg, int(math.log2(cfg.factor))
        if 2 ** n != cfg.factor:
            raise ValueError(f"autoencoder factor must be a power of 2, got {cfg.factor}")
        ch = [cfg.channels * 2 ** i for i in range(n + 1)]        # 16, 32, 64: width x2 per halving
        enc = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        for i in range(n):                                               # ResBlock, downsample by 2
            enc += [ResBlock(ch[i], ch[i], 0, 0.0),
                    nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1)]
        enc += [ResBlock(ch[n], ch[n], 0, 0.0), norm(ch[n]), nn.SiLU(),
                nn.Conv2d(ch[n], cfg.latent_channels, 3, padding=1)]
        dec = [nn.Conv2d(cfg.latent_channels, ch[n], 3, padding=1)]
        for i in reversed(range(n)):                                       # ResBlock, upsample by 2
            dec += [ResBlock(ch[i + 1], ch[i + 1], 0, 0.0),
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(ch[i + 1], ch[i], 3, padding=1)]
        dec += [ResBlock(ch[0], ch[0], 0, 0.0), norm(ch[0]), nn.SiLU(),
                nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("scale", torch.ones(()))                       # saved with the weights

    def forward(self, x):
        """The raw reconstruction (training: the loss needs the unclamped output)."""
        return self.decoder(self.encoder(x))

    def encode(self, x):
        """Images (B, 3, S, S) in [-1, 1] -> scaled latents (B, c, S/f, S/f), unit variance over the
        data."""
        if x.shape[-1] % self.cfg.factor or x.shape[-2] % self.cfg.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the "
                             f"autoencoder's factor {self.cfg.factor}")
        return self.encoder(x) * self.scale

    def decode(self, z):
        """Scaled latents -> images in [-1, 1]."""
        return self.decoder(z / self.scale).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------
# The autoencoder stage: trained on the real images, then frozen


def image_gradients(x):
    """Finite differences along x and y of (B, C, H, W) images: the autoencoder's optional edge
    term."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def psnr(a, b):
    """Mean over images of 10 log10(1 / MSE) with both (B, C, H, W) batches mapped from [-1, 1] to
    [0, 1]."""
    mse = (((a.float() - b.float()) / 2) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * mse.log10()).mean())


def reconstruction_grid(images, reconstructions, path, n=8):
    """Val images (top row) over their autoencoder reconstructions (bottom row), as a PNG."""
    tiles = [data.from_model_range(x) for x in images[:n]] + [
        data.from_model_range(x) for x in reconstructions[:n]
    ]
    big = [Image.fromarray(t).resize((2 * t.shape[1], 2 * t.shape[0]),
                                     Image.NEAREST) for t in tiles]
    data.image_grid(big, ncol=min(n, len(images))).save(path)


def ae_fingerprint(state):
    """A short hash of an autoencoder's weights (and scale): a latent generator records the one it
    learned."""
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
    """The scaled latents of every image of a dataset, in its order: (N, c, S/f, S/f). The encoder
    is deterministic and the images are not augmented, so a run encodes them once."""
    out = [ae.encode(dataset_images(ds, range(s, min(s + batch, len(ds)))).to(device))
           for s in tqdm(range(0, len(ds), batch), desc="encoding", leave=False,
                         disable=not progress)]
    return torch.cat(out)


def reconstruction_loss(x_rec, x, edge_weight=0.0):
    """The autoencoder's loss, in fp32: L1 of the reconstruction (+ edge_weight x L1 of its image
    gradients)."""
    x_rec, x = x_rec.float(), x.float()
    loss = (x_rec - x).abs().mean()                                                            # L1
    if edge_weight:
        loss = loss + edge_weight * sum((a - b).abs().mean()
                                        for a, b in zip(image_gradients(x_rec), image_gradients(x)))
    return loss


def train_autoencoder(cfg, root, path, log=print, device="cpu", dtype="fp32"):
    """The first stage of the latent space: L1 reconstruction of the real training images (+
    ae_edge_weight x L1 of their gradients), AdamW with the generator's warm-up and cosine schedule;
    then the latent scale 1 / std(E(x)) over the training images (SD's fixed 0.18215, measured
    here), and the PSNR on val images. Trains on `device` with the forward under the autocast
    `dtype` (resolved: fp32 | bf16 | fp16; the loss, the scale and the PSNR in fp32). Writes `path`
    (weights, config, fingerprint, PSNR) and beside it a PNG of val reconstructions; returns the
    summary dict."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    kw = dict(size=cfg.image_size, min_area=cfg.min_area, max_objects=cfg.max_objects)
    train_ds, val_ds = data.CocoLayoutDataset(root, "train", **kw), data.CocoLayoutDataset(root, "val", **kw)
    ae = Autoencoder(AutoencoderConfig(channels=cfg.ae_channels,
                                       latent_channels=cfg.ae_latent_channels,
                                       # initialised on the CPU: any device
                                       factor=cfg.ae_factor)).to(device)
    opt, t0 = optim.make_optimizer(ae, cfg, "adamw"), time.time()
    # fp16 gradients underflow unscaled
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    bar = tqdm(range(cfg.ae_steps), desc="autoencoder", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = optim.lr_at(cfg, step, step / cfg.ae_steps)
        x = dataset_images(train_ds,
                           optim.batch_indices(len(train_ds), cfg.batch_size, step,
                                               cfg.seed)).to(device)
        with config.autocast(device, dtype):
            x_rec = ae(x)
        loss = reconstruction_loss(x_rec, x, cfg.ae_edge_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % max(cfg.ae_steps // 5, 1) == 0:
            log(f"[autoencoder] step {step + 1}/{cfg.ae_steps} L1 {loss.item():.4f} "
                f"{time.time() - t0:.0f}s")
    ae.eval()
    with torch.no_grad():
        # unit-variance z
        ae.scale.fill_(1.0 / encode_dataset(ae, train_ds, device, progress=False).std().item())
        val = dataset_images(val_ds, range(min(256, len(val_ds)))).to(device)
        rec = ae.decode(ae.encode(val))
        val_psnr = psnr(rec, val)
    reconstruction_grid(val.cpu(), rec.cpu(), Path(path).with_suffix(".png"))
    info = dict(psnr_val=round(val_psnr, 2), scale=round(ae.scale.item(), 5), steps=cfg.ae_steps,
                seconds=round(time.time() - t0, 1), image_size=cfg.image_size, data=str(root),
                latent_shape=[cfg.ae_latent_channels, cfg.image_size // cfg.ae_factor,
                              cfg.image_size // cfg.ae_factor])
    config.save_module(path, KIND, ae, asdict(ae.cfg), fingerprint=ae_fingerprint(ae.state_dict()),
                       **info)
    log(f"[autoencoder] {path}: {cfg.image_size}px -> latents {info['latent_shape']}, val PSNR "
        f"{val_psnr:.2f} dB, scale {info['scale']}, {info['seconds']:.0f}s")
    return info


# --------------------------------------------------------------------------------------------------
# The frozen autoencoder of a run or checkpoint

def autoencoder_path(cfg, out):
    return Path(out) / "autoencoder.pt" if cfg.autoencoder == "auto" else Path(cfg.autoencoder)


def load_autoencoder(path, expect=None, owner=""):
    """autoencoder.pt -> (frozen Autoencoder in eval mode, fingerprint). `expect`: the fingerprint a
    checkpoint (`owner`) recorded. A missing file, a file of another kind, or another autoencoder
    (its latents mean something else) is a one-line DataError naming the file."""
    ae, _ = config.load_module(path, KIND, lambda c: Autoencoder(AutoencoderConfig(**c)),
                               "detdiff autoencoder",
                               hint="train one with python detdiff.py --space latent --stage "
                                    "autoencoder, or pass --autoencoder PATH")
    fp = ae_fingerprint(ae.state_dict())
    if expect and fp != expect:
        raise DataError(f"{path}: autoencoder {fp} is not the one {owner or 'the checkpoint'} was "
                        f"trained with ({expect}); pass that one with --autoencoder")
    return ae.requires_grad_(False), fp


def checkpoint_autoencoder(ck, ckpt_path, path="", device="cpu"):
    """The frozen autoencoder a latent-space checkpoint learned with, None for a pixel-space one:
    `path` if given, else the one the checkpoint recorded, else autoencoder.pt beside it. Another
    autoencoder is a DataError."""
    if ck.get("space", "pixel") == "pixel":
        if path:
            raise DataError(f"{ckpt_path}: a pixel-space checkpoint takes no --autoencoder")
        return None
    info = ck["autoencoder"]
    options = [Path(path)] if path else [Path(info["path"]),
                                         Path(ckpt_path).parent / "autoencoder.pt"]
    found = next((o for o in options if o.is_file()), options[0])
    return load_autoencoder(found, info["fingerprint"], ckpt_path)[0].to(device)
