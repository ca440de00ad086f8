"""Benchmark of the generator: training img/s, MFU, a diffusers peer, sampling, scaling, peak
memory.

Training throughput with its FLOPs and model FLOPs utilisation, diffusers' UNet at equal FLOPs timed
beside ours, the cost of each sampler, how training cost grows with image size and object count, and
the peak memory of a default training run.

    python -m tools.bench                  # the table, and bench.json; < 10 min on 2 quiet cores, compile included
    python -m tools.bench --quick          # 2 rounds, no compile, 20-step sampling only: checks that everything runs
    python -m tools.bench --profile        # torch.profiler's top ops of the default step (docs/performance.md)

What each number includes:
- train img/s: one full step of train.train's loop body on a fixed synthetic batch (B=32; every
  layout slot holds an object, its mask the filled box; `latent`: --space latent at 64 px, a 4 x 16
  x 16 latent x_0 with 64 px masks, the autoencoder not included because a run encodes its images
  once): condition dropout, q_sample, forward under autocast (with the perception head when the
  model has one), L_simple + lambda L_p, backward, grad clipping, the optimizer (the default: Muon
  for the hidden matrices, AdamW for the rest), EMA (the loss stays on the
  device, as in the loop, which reads it back once per log line). Not included: reading and
  collating the batch from disk, logging, checkpoints. One warm-up step, then rounds of steps (about
  1.5 s each); the median round counts. Rows timed against each other alternate rounds.
- GFLOPs: the UNet's forward per image, and the whole training step per image (forward and backward
  as executed: the first convolution needs no input gradient, attention's backward recomputes its
  scores), as torch.utils.flop_counter.FlopCounterMode counts them (matmuls, convolutions,
  attention; its table lacks the CPU flash-attention kernels, which `flops.count_flops` adds). MFU =
  step FLOPs per image x img/s / the peak of the same dtype: the best FLOP/s of a set of dense
  kernels (torch.matmul at three sizes, 1x1 and 3x3 convolutions; `flops.dense_kernels`), timed at
  the start and at the end.
- optimizer: the default step with AdamW and with Muon, and opt.step() alone, per dtype.
- peer: diffusers' UNet2DConditionModel sized to our forward FLOPs (within 10%), fed by our
  LayoutEncoder, both without the perception head (L_simple only), same step, both with AdamW. `pip
  install -r requirements-bench.txt`.
- sampling s/img: sample.generate for 32 layouts with classifier-free guidance 3 (a batch of 64 per
  forward), noise and sampler arithmetic included. DDPM walks T = 1000 steps: a few are timed and
  scaled to 1000.
- peak RSS: `python detdiff.py --stage generator` with default settings for a few steps on the
  shapes data in a temporary folder (final checkpoint and sample grid included), as the child
  process itself reports it.
On a CUDA device the same table runs there (fp16 with a GradScaler too, channels_last, compile).
"""
import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import config
import data
import diffusion
import optim
import sample
import train
from data_sets import shapes
from tools import flops
from unet import UNet, UNetConfig

WIDE = dict(base_channels=128)   # the "GPU-sized" config: 16x the default's FLOPs at the same depth
ROOT = Path(__file__).resolve().parent.parent   # the repository


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench.json", help="json written at the end (overwritten)")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds, no compile, fewer sampling rows")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time torch.compile on the default 32 px config (default: on, off with "
                         "--quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per row (default 5, --quick 2)")
    ap.add_argument("--round-s", type=float, default=1.5, help="seconds per timed round (about)")
    ap.add_argument("--batch", type=int, default=32,
                    help="images per training step and layouts per sampling run")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    ap.add_argument("--profile", action="store_true",
                    help="only print torch.profiler's top ops of the default step")
    a = ap.parse_args(argv)
    a.compile = (not a.quick) if a.compile is None else a.compile
    a.rounds = a.rounds or (2 if a.quick else 5)
    # a DataError for a device this machine lacks
    a.device, a.device_why = config.resolve_device(a.device)
    return a


# --------------------------------------------------------------------------------------------------
# Batches and the training step (the FLOP counting and timing are in flops.py)


def make_batch(tok, B, S, n_objects, device, seed=0):
    """A fixed batch: B layouts of n_objects random boxes each (padded to the tokenizer's M), their
    tokens and filled-box masks."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, n_objects, 2, generator=g) * 0.6
    # (B, n, 4) xyxy
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(B, n_objects, 2, generator=g) * 0.3], -1)
    labels = torch.randint(0, len(tok.class_names), (B, n_objects), generator=g)
    masks = data.box_pixels(boxes, S)                                                 # (B, n, S, S)
    return dict(image=(torch.rand(B, 3, S, S, generator=g) * 2 - 1).to(device),
                tokens=torch.stack([tok.encode(b, l) for b, l in zip(boxes, labels)]).to(device),
                boxes=nn.functional.pad(boxes, (0, 0, 0, tok.max_objects - n_objects)).to(device),
                masks=nn.functional.pad(masks.float(),
                                        (0, 0, 0, 0, 0, tok.max_objects - n_objects)).to(device),
                # (B, M)
                valid=(torch.arange(tok.max_objects) < n_objects).expand(B, -1).to(device))


class PeerUNet(nn.Module):
    """diffusers' UNet2DConditionModel behind our LayoutEncoder, called like ours: model(x_t, t,
    tokens)."""
    def __init__(self, encoder, unet):
        super().__init__()
        self.encoder, self.unet = encoder, unet

    def forward(self, x_t, t, tokens):
        c = self.encoder(tokens)
        return self.unet(x_t, t, encoder_hidden_states=c["context"],
                         encoder_attention_mask=c["context_mask"],
                         return_dict=False)[0]


def make_step(raw, batch, null, dtype, device, compile=False, tc=train.TrainConfig()):
    """A step() that calls train.train_step on one fixed batch with its own optimizer and EMA."""
    if device.type == "cuda":                # channels_last: the layout cuDNN's convolutions prefer
        raw = raw.to(memory_format=torch.channels_last)
        batch = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last))
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    diff = diffusion.Diffusion(tc.timesteps, tc.schedule).to(device)
    opt = optim.make_optimizer(raw, tc, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    model = torch.compile(raw) if compile else raw
    amp = config.autocast(device, dtype)
    if getattr(raw, "mask_head", None) is None:   # the peer has no perception head: L_simple alone
        tc = dataclasses.replace(tc, pal_weight=0.0)
    count = [0]

    def step():                                    # the training loop's own step function
        loss, _, _ = train.train_step(model, raw, ema, opt, scaler, diff, amp, batch, null, tc,
                                      count[0])
        count[0] += 1
        return loss                        # read back once per log line by the loop, not every step
    step.opt = opt                         # Bench.optimizers times its step() alone
    return step


def diffusers_config(encoder, target, S, device):
    """The UNet2DConditionModel kwargs whose forward FLOPs per image (our LayoutEncoder included)
    come closest to `target`, in our shape (3 levels, cross-attention at levels 1-2 and the middle,
    4 heads, cross_attention_dim = the encoder's width): a grid over widths and depths, counted on
    the meta device (no weights). -> (kwargs, FLOPs)"""
    from diffusers import UNet2DConditionModel   # optional (requirements-bench.txt): only the peer
                                                 # row needs it
    tokens = torch.stack([data.LayoutTokenizer(shapes.SHAPES).null_prompt()] * 2).to(device)
    c, f_enc = encoder(tokens), flops.count_flops(lambda: encoder(tokens)) / 2
    x, t = torch.zeros(2, 3, S, S, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    best = None
    for layers in (1, 2):
        for c0 in (16, 24, 32):
            for c1 in range(c0, 2 * c0 + 1, 8):
                kw = dict(sample_size=S, in_channels=3, out_channels=3,
                          block_out_channels=(c0, c1, c1),
                          layers_per_block=layers, norm_num_groups=8,
                          cross_attention_dim=encoder.cfg.d_model,
                          attention_head_dim=4,   # diffusers' legacy name: this is the number of
                                                  # heads
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                            "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
                with torch.device("meta"):
                    m = UNet2DConditionModel(**kw)
                f = f_enc + flops.count_flops(lambda: m(x, t,
                                                        encoder_hidden_states=c["context"].to("meta"),
                                                        encoder_attention_mask=c["context_mask"].to("meta"))) / 2
                if best is None or abs(f / target - 1) < abs(best[1] / target - 1):
                    best = (kw, f)
    if abs(best[1] / target - 1) > 0.1:
        raise RuntimeError(f"no diffusers config within 10% of {target / 1e9:.3f} GFLOPs (closest "
                           f"{best[1] / 1e9:.3f})")
    return best


def diffusers_peer(encoder, target, S, device):
    """The default peer: diffusers' UNet2DConditionModel within 10% of `target` forward FLOPs
    (diffusers_config), fed by a copy of our layout encoder. -> (name, config, module)"""
    import diffusers                             # optional, as above
    kw, _ = diffusers_config(encoder, target, S, device)
    torch.manual_seed(0)
    name = (f"diffusers {diffusers.__version__} UNet2DConditionModel "
            f"{tuple(kw['block_out_channels'])} x{kw['layers_per_block']}")
    return name, kw, PeerUNet(copy.deepcopy(encoder),
                              diffusers.UNet2DConditionModel(**kw)).to(device)


# --------------------------------------------------------------------------------------------------
# The parts of the table

class Bench:
    def __init__(self, a):
        self.a, self.dev, self.t0, self.res = a, a.device, time.time(), {}
        # bf16 rows only where bf16 is native: a CPU without AVX-512 BF16 / AMX emulates it, many
        # times slower, and its rows (and its 4096 x 4096 bf16 peak matmul) would take most of an
        # hour to measure what nobody runs
        native = config.resolve_dtype("auto", self.dev)[0] == "bf16"
        self.dtypes = ["fp32"] + (["bf16"] if native else []) + (["fp16"] if self.dev.type == "cuda" else [])
        self.headline = "bf16" if native else "fp32"     # the dtype a run on this machine trains in
        self.tok = {M: data.LayoutTokenizer(shapes.SHAPES, max_objects=M) for M in (1, 8, 16)}

    def log(self, msg):
        print(f"[{time.time() - self.t0:4.0f}s] {msg}", flush=True)

    def model(self, M=8, **kw):
        torch.manual_seed(0)
        return UNet(UNetConfig.for_tokenizer(self.tok[M], **kw),
                    loc_xy=self.tok[M].location_xy()).to(self.dev)

    def batch(self, B, S, M=8):
        return make_batch(self.tok[M], B, S, M, self.dev), self.tok[M].null_prompt().to(self.dev)

    def fwd_flops(self, model, S, M=8, in_channels=3):
        """Forward FLOPs per image (S: the side of x_t), the perception head's mask logits included
        when the model has one."""
        (b, _), t = self.batch(2, S, M), torch.zeros(2, dtype=torch.long, device=self.dev)
        x = torch.randn(2, in_channels, S, S, device=self.dev)
        kw = dict(return_features=True) if getattr(model, "mask_head", None) is not None else {}
        return flops.count_flops(lambda: model(x, t, b["tokens"], **kw)) / 2

    def step_flops(self, model, S, M=8, in_channels=3, masks_S=None):
        """FLOPs per image of one whole training step (train.train_step: forward, losses, backward)
        as executed, counted on a copy of the model with a batch of 2."""
        b, null = self.batch(2, masks_S or S, M)
        if in_channels != 3 or masks_S:
            b["image"] = torch.randn(2, in_channels, S, S, device=self.dev)
        step = make_step(copy.deepcopy(model), b, null, "fp32", self.dev)
        return flops.count_flops(step, grad=True) / 2

    def train(self, name, S=32, M=8, dtype="fp32", compile=False, latent=0, **mkw):
        """One row of the training table: img/s and forward GFLOPs (MFU follows at the end, from the
        peaks). latent = f: --space latent at image side S, x_0 a (4, S/f, S/f) latent, the masks at
        S (the encoder runs once before training, so a step does not include it)."""
        m, B = self.model(M, **(dict(mkw, in_channels=4) if latent else mkw)), self.a.batch
        b, null = self.batch(B, S, M)
        if latent:
            g = torch.Generator().manual_seed(0)
            b["image"] = torch.randn(B, 4, S // latent, S // latent, generator=g).to(self.dev)
        f_step = self.step_flops(m, S // latent if latent else S, M, 4 if latent else 3,
                                 S if latent else None)
        (s, warm), = flops.time_rounds({name: make_step(m, b, null, dtype, self.dev, compile)},
                                       self.dev,
                                       self.a.rounds, self.a.round_s).values()
        f = self.fwd_flops(m, S // latent if latent else S, M, 4 if latent else 3)
        row = self.res.setdefault("train", {})[name] = dict(
            S=S, latent=latent, objects=M, dtype=dtype, compile=compile, batch=B,
            img_s=round(B / s, 2),
            gflops_fwd=round(f / 1e9, 4), gflops_step=round(f_step / 1e9, 4),
            params_m=round(sum(p.numel() for p in m.parameters()) / 1e6, 3),
            warmup_s=round(warm, 1))
        self.log(f"train {name}: {row['img_s']} img/s, {row['gflops_fwd']} GFLOPs fwd, "
                 f"{row['gflops_step']} per step, {f_step * B / s / 1e9:.0f} GFLOP/s" + (f", compile + first step {warm:.0f}s" if compile else ""))

    def optimizers(self, S=32):
        """The optimiser's share of the default step, per dtype: the whole step with AdamW and with
        Muon (alternating rounds), and opt.step() alone on the gradients the last step left."""
        rows = self.res["optimizer"] = {}
        for dt in self.dtypes:
            steps = {f"{kind} {dt}": make_step(self.model(), *self.batch(self.a.batch, S), dt,
                                               self.dev,
                                               tc=dataclasses.replace(train.TrainConfig(),
                                                                      optimizer=kind))
                     for kind in ("adamw", "muon")}
            whole = flops.time_rounds(steps, self.dev, self.a.rounds, self.a.round_s)
            alone = flops.time_rounds({k: fn.opt.step for k, fn in steps.items()}, self.dev,
                                      self.a.rounds, self.a.round_s)
            for k in steps:
                rows[k] = dict(img_s=round(self.a.batch / whole[k][0], 2),
                               opt_ms=round(1e3 * alone[k][0], 1),
                               share=round(alone[k][0] / whole[k][0], 3))
            self.log(f"optimizer {dt}: " + ", ".join(
                f"{k.split()[0]} {rows[k]['img_s']} img/s, step {rows[k]['opt_ms']} ms "
                f"({100 * rows[k]['share']:.0f}%)" for k in steps))

    def peer(self, S=32, build=None):
        """Ours (the default config) vs a peer UNet at equal forward FLOPs, both L_simple only,
        alternating rounds. build(encoder, target FLOPs, S, device) -> (name, config, module called
        like ours); default: diffusers' UNet2DConditionModel (diffusers_peer). tests/test_bench.py
        drives this path with a stand-in."""
        if build is None:
            if importlib.util.find_spec("diffusers") is None:
                self.log("peer: diffusers is not installed, row skipped (pip install -r "
                         "requirements-bench.txt)")
                return
            build = diffusers_peer
        ours = self.model(mask_dim=0)
        target = self.fwd_flops(ours, S)
        name, config, theirs = build(ours.encoder, target, S, self.dev)
        f = self.fwd_flops(theirs, S)                # confirmed on the real model
        # AdamW for both: optim.muon_params knows our module names, not the peer's
        adamw = dataclasses.replace(train.TrainConfig(), optimizer="adamw")
        fns = {f"{who} {dt}": make_step(copy.deepcopy(m), *self.batch(self.a.batch, S), dt,
                                        self.dev, tc=adamw)
               for dt in self.dtypes for who, m in (("ours", ours), ("peer", theirs))}
        img_s = {k: round(self.a.batch / s, 2)
                 for k,
                 (s, _) in flops.time_rounds(fns, self.dev, self.a.rounds, self.a.round_s).items()}
        n_params = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)  # noqa: E731
        p = self.res["peer"] = dict(
            name=name, config=config, gflops_ours=round(target / 1e9, 4),
            gflops_peer=round(f / 1e9, 4),
            flop_ratio=round(f / target, 3), params_m_ours=n_params(ours),
            params_m_peer=n_params(theirs),
            img_s=img_s,
            ratio={dt: round(img_s[f"ours {dt}"] / img_s[f"peer {dt}"], 3) for dt in self.dtypes})
        self.log(f"peer: {name} at {p['flop_ratio']}x our FLOPs; img/s ours/peer {p['ratio']}")

    def sampling(self, S=32, guidance=3.0):
        """Seconds per image of sample.generate (B layouts, guidance doubles the batch) per sampler,
        steps, dtype."""
        m, B = self.model().eval(), self.a.batch
        (b, null), diff, rows = self.batch(B, S), diffusion.Diffusion(1000, "cosine").to(self.dev), {}

        def s_per_img(d, sampler, steps, dtype):
            flops.sync(self.dev)
            t0 = time.perf_counter()
            sample.generate(m, d, b["tokens"], null, S, steps, sampler, guidance=guidance,
                            generator=torch.Generator().manual_seed(0), dtype=dtype, progress=False)
            flops.sync(self.dev)
            return (time.perf_counter() - t0) / B
        n_ddpm = 4 if self.a.quick else 10
        for dtype in self.dtypes:
            s_per_img(diff, "ddim", 2, dtype)                                          # warm-up
            for sampler in ("ddim", "dpm++2m"):
                for n in (20,) if self.a.quick else (20, 25, 50):
                    rows[f"{sampler}-{n} {dtype}"] = round(s_per_img(diff, sampler, n, dtype), 4)
            # DDPM walks all T steps: a schedule with T = n_ddpm walks n_ddpm of them, each at the
            # same cost
            rows[f"ddpm-1000 {dtype} (extrapolated from {n_ddpm} steps)"] = round(
                s_per_img(diffusion.Diffusion(n_ddpm, "cosine").to(self.dev), "ddpm", None,
                          dtype) * 1000 / n_ddpm, 3)
            self.log(f"sampling {dtype}: " + ", ".join(f"{k.split()[0]} {v}" for k,
                                                       v in rows.items() if dtype in k))
        self.res["sampling_s_per_img"] = rows

    def peak_rss(self, steps):
        """Peak resident memory of a default generator run; the child reports its own ru_maxrss (KB
        on Linux). A failed child is a RuntimeError carrying the end of its stderr."""
        code = ("import resource, runpy, sys; sys.argv = ['detdiff.py'] + sys.argv[1:]; "
                "runpy.run_path('detdiff.py', run_name='__main__'); "
                "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
                "print('peak_rss_mb', r / 2 ** 20 if sys.platform == 'darwin' else r / 2 ** 10)")
        shapes.build_if_missing("shapes")            # written once on a fresh machine (~10 s), not
                                                     # part of the run
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            p = subprocess.run([sys.executable, "-c", code, "--stage", "generator", "--steps",
                                str(steps),
                                "--minutes", "0", "--out", str(Path(tmp) / "run"), "--device",
                                str(self.dev)],
                               cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"the peak-memory run (detdiff.py --stage generator) exited "
                               f"{p.returncode}:\n{p.stderr[-2000:]}")
        mb = float(p.stdout.split("peak_rss_mb")[-1])
        self.res["peak_rss"] = dict(peak_rss_mb=round(mb), steps=steps,
                                    seconds=round(time.time() - t0, 1))
        self.log(f"peak RSS of `detdiff.py --stage generator --steps {steps}`: {mb:.0f} MB "
                 f"({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------------------------------
# Report

def hardware(device):
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    # noqa
    line = lambda key: next((l.split(":",
                                     1)[1].strip() for l in info.splitlines() if l.startswith(key)),
                            "")
    return dict(cpu=line("model name") or platform.processor(), cores=os.cpu_count(),
                threads=torch.get_num_threads(),
                bf16_isa=[f for f in line("flags").split() if f in ("avx512_bf16", "amx_bf16")],
                torch=torch.__version__, python=platform.python_version(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                loadavg_start=[round(v, 2) for v in os.getloadavg()])


def table(r):
    h, B = r["hardware"], r["settings"]["batch"]
    out = [f"== detdiff bench {r['date']}: {h['cpu']}, {h['cores']} cores, torch {h['torch']}, "
           f"{h['device']}; load average {h['loadavg_start'][0]} at start, {h['loadavg_end'][0]} "
           f"at end ==",
           "peak (best dense kernel) " + "   ".join(f"{k} {v / 1e9:.0f} GFLOP/s "
                                                    f"({r['peak_kernel'][k]})"
                                                   for k, v in r["peak_flops"].items()),
           f"{'training step, B=' + str(B):34s} {'img/s':>7s} {'GFLOPs':>7s} {'/step':>7s} "
           f"{'MFU':>6s} {'params':>7s}"]
    for k, v in r["train"].items():
        out.append(f"  {k:32s} {v['img_s']:7.1f} {v['gflops_fwd']:7.3f} {v['gflops_step']:7.3f} "
                   f"{100 * v['mfu']:5.1f}% {v['params_m']:6.2f}M" + (f"   (compile + first step "
                                                                      f"{v['warmup_s']:.0f}s)" if v["compile"] else ""))
    over = [k for k, v in r["train"].items() if v["mfu"] > 1]
    if over:
        out.append(f"  warning: MFU over 100% in {', '.join(over)}: the peak or the FLOP count is "
                   f"wrong")
    if "peer" in r:
        p = r["peer"]
        out.append(f"peer: {p['name']}: {p['gflops_peer']:.3f} vs our {p['gflops_ours']:.3f} "
                   f"GFLOPs forward ({p['flop_ratio']:.2f}x), {p['params_m_peer']:.2f}M vs "
                   f"{p['params_m_ours']:.2f}M params")
        out += [f"  {dt:5s} ours {p['img_s']['ours ' + dt]:6.1f} img/s, peer "
                f"{p['img_s']['peer ' + dt]:6.1f} img/s: ours/peer {x:.2f}x" for dt,
                x in p["ratio"].items()]
    if "optimizer" in r:
        out.append("optimizer, default 32 px step: img/s, opt.step() alone, its share of the step")
        out += [f"  {k:32s} {v['img_s']:7.1f} {v['opt_ms']:7.1f} ms {100 * v['share']:5.1f}%"
                for k, v in r["optimizer"].items()]
    out.append(f"sampling, s per image (B={B}, guidance 3)")
    out += [f"  {k:46s} {v:7.3f}" for k, v in r["sampling_s_per_img"].items()]
    out += [f"scaling {k}: " + ", ".join(f"{x} {i:.1f}" for x,
                                         i in zip(v["at"], v["img_s"])) + " img/s; cost per "
            f"image x{v['cost_ratio']}, FLOPs x{v['flop_ratio']}" for k, v in r["scaling"].items()]
    out.append(f"peak RSS of a default training run: {r['peak_rss_mb']} MB "
               f"({r['peak_rss']['steps']} steps)")
    hd = r.get("headline_dtype", "bf16")
    out.append(f"headline ({hd}): train {r['train_img_s']} img/s, MFU {100 * r['mfu']:.1f}% of the "
               f"{hd} peak, ours/diffusers {r['peer_ratio'] or 'n/a (no diffusers)'}, "
               f"{r['sampler']} {r['sample_s_per_img']} s/img; bench {r['seconds']:.0f}s")
    return "\n".join(out)


def profile(a, steps=3):
    """torch.profiler over a few default 32 px training steps per dtype: the top ops by self CPU
    time."""
    bn = Bench(a)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if a.device.type == "cuda"
                                                     else [])
    for dt in bn.dtypes:
        step = make_step(bn.model(), *bn.batch(a.batch, 32), dt, a.device)
        step(), step()
        with torch.profiler.profile(activities=acts) as p:
            for _ in range(steps):
                step()
        print(f"== default 32 px training step, B={a.batch}, {dt}, {steps} steps ==")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main(argv=None):
    try:
        a = parse_args(argv)
        if a.profile:
            profile(a)
        else:
            run(a)
    except config.DataError as err:
        raise SystemExit(f"error: {err}") from None


def run(a):
    """The whole bench: every row, the table, and the json at a.out."""
    bn, dev = Bench(a), a.device
    r = bn.res
    r.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), hardware=hardware(dev),
             settings=dict(batch=a.batch, rounds=a.rounds, quick=a.quick, compile=a.compile))
    bn.log(f"{r['hardware']['cpu']}, {r['hardware']['cores']} cores, torch {torch.__version__}, "
           f"device {dev} ({a.device_why}); dtypes {', '.join(bn.dtypes)}" + ("" if "bf16" in bn.dtypes else
                                                                " (no bf16 rows: this CPU would "
                                                                "emulate it)"))
    if os.getloadavg()[0] > 0.5 * os.cpu_count():   # a preempted OpenMP thread stalls the others:
                                                    # steps 10-25x slower
        bn.log(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before "
               f"starting: other processes share the CPU, timings will be low and noisy")
    bn.peak_rss(3 if a.quick else 20)            # first: a child process, before this one has grown
    # at the start and at the end: the best counts
    peaks = [{dt: flops.dense_peak(dt, dev)[1] for dt in bn.dtypes}]
    for S, mkw, name in ((32, {}, "default"), (64, {}, "default"), (64, dict(latent=4), "default"),
                         (32, WIDE, "wide")):
        for dt in bn.dtypes:
            bn.train(f"{name} {S}px{' latent' if mkw.get('latent') else ''} {dt}", S=S, dtype=dt,
                     **mkw)
    if a.compile:
        bn.train(f"default 32px {bn.headline} compile", dtype=bn.headline, compile=True)
    bn.train("default 128px fp32", S=128)
    for M in (1, 16):
        bn.train(f"default 32px fp32 {M} objects", M=M)
    bn.optimizers()
    bn.peer()
    bn.sampling()
    peaks.append({dt: flops.dense_peak(dt, dev)[1] for dt in bn.dtypes})
    r["peak_flops_measured"] = {dt: {k: round(max(p[dt][k] for p in peaks) / 1e9,
                                              1) for k in peaks[0][dt]}
                                for dt in bn.dtypes}       # GFLOP/s per kernel, best of both passes
    r["peak_kernel"] = {dt: max(v, key=v.get) for dt, v in r["peak_flops_measured"].items()}
    r["peak_flops"] = {dt: 1e9 * r["peak_flops_measured"][dt][r["peak_kernel"][dt]] for dt in bn.dtypes}
    bn.log("peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s ({r['peak_kernel'][k]})" for k,
                                v in r["peak_flops"].items()))
    for row in r["train"].values():
        row["mfu"] = round(flops.mfu(row["gflops_step"] * 1e9, row["img_s"],
                                     r["peak_flops"][row["dtype"]]), 4)
    # scaling: the cost per image as S doubles and as the layouts hold more objects (fp32 rows)
    tr = r["train"]
    rows = dict(image_size=(["32px", "64px", "128px"],
                            [tr[f"default {S}px fp32"] for S in (32, 64, 128)]),
                objects=(["1", "8", "16"],
                         [tr[f"default 32px fp32{s}"] for s in (" 1 objects", "", " 16 objects")]))
    r["scaling"] = {k: dict(at=at, img_s=[x["img_s"] for x in v],
                            cost_ratio=flops.growth([1 / x["img_s"] for x in v]),
                            flop_ratio=flops.growth([x["gflops_fwd"] for x in v])) for k,
                    (at, v) in rows.items()}
    # the headline keys
    hd = bn.headline
    d = tr[f"default 32px {hd}"]
    r.update(headline_dtype=hd, train_img_s=d["img_s"], mfu=d["mfu"],
             mfu_fp32=tr["default 32px fp32"]["mfu"],
             gflops_fwd=d["gflops_fwd"], peer_ratio=r.get("peer", {}).get("ratio", {}).get(hd),
             sampler=f"dpm++2m-20 {hd}",
             sample_s_per_img=r["sampling_s_per_img"][f"dpm++2m-20 {hd}"],
             peak_rss_mb=r["peak_rss"]["peak_rss_mb"], seconds=round(time.time() - bn.t0, 1))
    r["hardware"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(table(r))
    Path(a.out).write_text(json.dumps(r, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
