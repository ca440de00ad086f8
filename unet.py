"""The layout-conditioned UNet eps_theta(x_t, t, layout tokens) and its layout encoder.

docs/paper.md section 1 (GeoDiffusion-style layout-as-text conditioning). The diffusion code in
train.py and sample.py only ever calls `model(x_t, t, tokens)`; everything about how the layout
tokens reach the image lives here. Shapes of both parts are in `UNetConfig`, which every checkpoint
carries.

- LayoutEncoder: a small pre-LN transformer over the token ids (our stand-in for GeoDiffusion's
  fine-tuned CLIP text encoder). Location-token embeddings start from 2-D sin-cos embeddings of
  their bin position (GeoDiffusion). `cond="tokens"` is the paper's setting: every token of the
  prompt is a cross-attention key. `cond="paint"` (beyond the paper; the default,
  docs/experiments.md#what-the-generator-learns-per-cpu-minute) pools each object's fixed slot of
  tokens into ONE embedding per object, the cross-attention keys, and adds LayoutDiffusion's
  position-aware fusion (Zheng et al., CVPR 2023): each object's embedding and the pixel's position
  inside its box are painted into the box as a feature map (`paint_objects`; the boxes are read back
  from the prompt's location tokens, `data.slot_boxes`), and a 1x1 convolution of that map,
  area-averaged to each resolution, is added to the input of every ResBlock. So every pixel of a box
  is told which object it belongs to and where in it it lies, instead of having to find that out
  through cross-attention at 16 and 8 px. The prompt itself is the paper's in both settings.
- UNet: sinusoidal time embedding + MLP, ResBlocks (GroupNorm, SiLU), down/up paths with skips,
  self-attention at low resolution, cross-attention to the layout embeddings at chosen resolutions.
- `model(x_t, t, tokens, return_features=True)` also returns the decoder features at every
  resolution, the per-object embeddings and, when `mask_dim > 0`, the perception head's per-object
  mask logits (perception.py; the head lives in the same module so that DDP, EMA and checkpoints
  carry it without special cases).
- The autoencoder of `--space latent` (the frozen first stage the UNet learns in) is in
  autoencoder.py; it reuses `ResBlock` and `norm` from here.

Quick check: python -c "import unet; m = unet.UNet(unet.UNetConfig()); print(sum(p.numel() for p in
m.parameters()))" """
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import data
from perception import MaskHead


MAX_SIDE = 256   # the largest side of a feature map with cross-attention (a 256 x 256 map is 65,536
                 # queries)


@dataclass
class UNetConfig:
    CHOICES: ClassVar[dict] = dict(cond=("tokens", "paint"))
    RETIRED: ClassVar[dict] = dict(location="grid")   # config.from_saved: one form of location tokens is left
    # image side
    in_channels: int = 3
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)     # one entry per resolution level; S must be divisible by
                                         # 2**(len-1)
    num_res_blocks: int = 1
    self_attn_levels: tuple = (2,)       # levels (indices into channel_mults) with self-attention;
                                         # mid always has it
    cross_attn_levels: tuple = (1, 2)    # levels with cross-attention to the layout; mid always has
                                         # it
    heads: int = 4
    dropout: float = 0.0
    # layout encoder (the token-vocabulary fields are filled from data.LayoutTokenizer by
    # for_tokenizer)
    cond: str = "paint"                  # "tokens": the paper's (cross-attention to every prompt
                                         # token); "paint": one pooled embedding per object, and
                                         # each object painted into its box as feature maps
                                         # (position-aware fusion, beyond the paper)
    d_model: int = 64
    enc_layers: int = 2
    enc_heads: int = 4
    vocab_size: int = 64
    seq_len: int = 34
    tokens_per_object: int = 4
    max_objects: int = 8
    pad_id: int = 0
    class_offset: int = 7    # ids class_offset .. loc_offset-1 are categories (start a real object)
    loc_offset: int = 14                 # ids from loc_offset on are location tokens
    bins: int = 32            # location bins per axis (the sin-cos init measures positions in bins)
    # perception head (perception.MaskHead): per-pixel embedding width; 0 = no head (--pal-weight 0)
    mask_dim: int = 32

    @classmethod
    def for_tokenizer(cls, tok, **overrides):
        """The config whose vocabulary fields match a data.LayoutTokenizer."""
        return cls(vocab_size=tok.vocab_size, seq_len=tok.seq_len,
                   tokens_per_object=tok.tokens_per_object,
                   max_objects=tok.max_objects, pad_id=tok.pad_id, class_offset=tok.class_offset,
                   loc_offset=tok.loc_offset, bins=tok.bins, **overrides)

    @property
    def down_factor(self):
        return 2 ** (len(self.channel_mults) - 1)


def sincos_1d(pos, dim, omega=None):
    """Transformer sin-cos embedding of float positions (N,) -> (N, dim); positions are in 'bin-ish'
    units. Computed in pos's dtype on pos's device: float64 for the tables built once on the CPU
    (location-token init, position tables), float32 on the training device (MPS has no float64).
    `omega`: the frequency table (dim/2,), `frequencies(dim)`, when the caller keeps one as a
    buffer."""
    if omega is None:
        omega = frequencies(dim, pos.dtype if pos.dtype == torch.float64 else torch.float32,
                            pos.device)
    ang = pos.to(omega.dtype)[:, None] * omega[None]                                    # (N, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


def frequencies(dim, dtype=torch.float32, device=None):
    """omega_k = 1 / 10000^(k / (dim/2)), k = 0..dim/2-1: the frequencies of sincos_1d (computed in
    float64)."""
    k = torch.arange(dim // 2, dtype=torch.float64, device="cpu")
    return (1.0 / 10000 ** (k / (dim // 2))).to(device=device, dtype=dtype)


def sincos_2d(xy, dim, scale):
    """2-D sin-cos embedding (MAE; GeoDiffusion's location-token init) of points xy (N, 2) in [0,
    1], measured in units of 1/scale (bins for location tokens, pixels for feature maps): half the
    channels encode x, half y."""
    assert dim % 4 == 0, "sin-cos 2-D embedding needs dim divisible by 4"
    return torch.cat([sincos_1d(xy[:, 0] * scale, dim // 2), sincos_1d(xy[:, 1] * scale, dim // 2)],
                     dim=1)


def timestep_embedding(t, dim, omega=None):
    """DDPM's sinusoidal embedding of the integer timestep t (B,) -> (B, dim), in float32 on t's
    device. float32 is enough: for t < 1000 the angle t * omega is off by at most ~1e-4 rad from
    float64's, well below what the bf16 time MLP resolves (4e-3); tests/test_devices.py checks it
    against the float64 table."""
    return sincos_1d(t.float(), dim, omega)


# --------------------------------------------------------------------------------------------------
# Objects painted into their boxes (cond="paint"; LayoutDiffusion's position-aware fusion, beyond
# the paper)

def box_masks(boxes, valid, S):
    """Where each object is on an S x S grid: inside (B, M, S, S), 1 at object i's pixels
    (data.box_spans' rule: centre in [x0, x1) x [y0, y1)), and uv (B, 2, S, S), each pixel's
    position relative to its box, from -1 at the left / top edge to 1 at the right / bottom edge,
    summed over the boxes it lies in (0 outside every box). boxes (B, M, 4) xyxy in [0, 1], valid
    (B, M) bool (empty slots are nowhere)."""
    c, in_x, in_y = data.box_spans(boxes.float(), S)                            # (S,), (B, M, S) x2
    x0, y0, x1, y1 = (boxes[..., i, None].float() for i in range(4))               # (B, M, 1)
    u = (2 * (c - x0) / (x1 - x0).clamp(min=1e-6) - 1) * in_x                    # (B, M, S) along x
    v = (2 * (c - y0) / (y1 - y0).clamp(min=1e-6) - 1) * in_y                    # (B, M, S) along y
    # (B, M, S, S)
    inside = (in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]).float()
    uu = torch.einsum("bmw,bmhw->bhw", u, inside)                          # u depends on the column
    vv = torch.einsum("bmh,bmhw->bhw", v, inside)                                    # v on the row
    return inside, torch.stack([uu, vv], 1)


def paint_objects(objects, boxes, valid, S):
    """The layout as an (B, D + 2, S, S) map: every pixel inside object i's box holds [e_i, u, v],
    e_i the object's embedding (B, M, D) and (u, v) the pixel's position in the box (box_masks);
    summed where boxes overlap, zero outside every box and for the null prompt (no valid object)."""
    inside, uv = box_masks(boxes, valid, S)
    emb = torch.einsum("bmd,bmhw->bdhw", objects.float(), inside)
    return torch.cat([emb, uv], 1).to(objects.dtype)                              # (B, D + 2, S, S)


def painted_conv(conv, objects, inside, uv):
    """conv (a 1x1 nn.Conv2d of D + 2 -> C channels) of the painted map, area-averaged to the
    resolution of `inside` / `uv` (box_masks, pooled): what conv(avg_pool(paint_objects(...)))
    gives, computed without the map. Both are linear, so the 1x1 conv of [e_i, u, v] is W_e e_i +
    W_uv (u, v) + b; each object's W_e e_i is painted with its pooled mask: B M C h w multiply-adds
    per ResBlock instead of B (D + 2) C h w."""
    W = conv.weight[:, :, 0, 0]                                                       # (C, D + 2)
    emb = objects @ W[:, :-2].t().to(objects.dtype)                                   # (B, M, C)
    return (torch.einsum("bmc,bmhw->bchw", emb, inside.to(emb.dtype))
            + torch.einsum("cj,bjhw->bchw", W[:, -2:].to(emb.dtype),
                           uv.to(emb.dtype)) + conv.bias[:, None, None])


# --------------------------------------------------------------------------------------------------
# Layout encoder

class LayoutEncoder(nn.Module):
    def __init__(self, cfg, loc_xy=None):
        """loc_xy: optional (num_location_tokens, 2) bin positions (x, y) in [0, 1] of the location
        tokens (ids loc_offset, loc_offset+1, ...; tok.location_xy()), used for the sin-cos
        initialisation. It only matters at construction; a checkpoint restores the trained
        values."""
        super().__init__()
        self.cfg = cfg
        D, T = cfg.d_model, cfg.tokens_per_object
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        if loc_xy is not None:
            with torch.no_grad():
                xy = torch.as_tensor(loc_xy, dtype=torch.float64)                     # (N, 2)
                ids = torch.arange(len(xy)) + cfg.loc_offset
                # RMS 1, as N(0, 1) rows
                self.tok_emb.weight[ids] = sincos_2d(xy, D, cfg.bins - 1) * math.sqrt(2)
        # role of each position: 0 = bos, 1..T = slot inside an object, T+1 = after the last object
        # slot
        L, M = cfg.seq_len, cfg.max_objects
        role = torch.tensor(
            [0] + [1 + (p - 1) % T for p in range(1, 1 + M * T)] + [T + 1] * (L - 1 - M * T)
        )
        self.register_buffer("role", role, persistent=False)
        self.role_emb = nn.Embedding(T + 2, D)
        layer = nn.TransformerEncoderLayer(D, cfg.enc_heads, 4 * D, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.enc_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(D)
        if cfg.cond == "paint":
            self.pool = nn.Sequential(nn.Linear(T * D, D), nn.GELU(), nn.Linear(D, D),
                                      nn.LayerNorm(D))
        elif cfg.cond != "tokens":
            raise ValueError(f"UNetConfig.cond must be 'tokens' or 'paint', got {cfg.cond!r}")

    def forward(self, tokens):
        """tokens (B, L) long -> dict(context (B, Lc, D), context_mask (B, Lc) bool True=attend,
        objects (B, M, D), object_valid (B, M) bool, boxes (B, M, 4) read back from the location
        tokens)."""
        cfg, T, M = self.cfg, self.cfg.tokens_per_object, self.cfg.max_objects
        if tokens.shape[1] != cfg.seq_len:
            raise ValueError(f"layout tokens have length {tokens.shape[1]}, the model was built "
                             f"for {cfg.seq_len}")
        pad = tokens == cfg.pad_id                                               # (B, L)
        h = self.tok_emb(tokens) + self.role_emb(self.role)[None]                # (B, L, D)
        h = self.ln(self.transformer(h, src_key_padding_mask=pad))
        ids, valid = data.object_slots(tokens, cfg)                 # (B, M, T), (B, M) real objects
        if cfg.cond != "tokens":
            slots = rearrange(h[:, 1:1 + M * T], "b (m t) d -> b m (t d)", t=T)  # (B, M, T*D)
            objects = self.pool(slots)                                           # (B, M, D)
            # the bos output is a global key that is always present, so the null prompt still has a
            # key
            context = torch.cat([h[:, :1], objects], 1)                          # (B, 1+M, D)
            mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
        else:
            # (B, M, D) for the mask head
            objects = rearrange(h[:, 1:1 + M * T], "b (m t) d -> b m t d", t=T).mean(2)
            context, mask = h, ~pad                                    # paper: every token is a key
        return dict(context=context, context_mask=mask, objects=objects, object_valid=valid,
                    boxes=data.slot_boxes(ids, cfg))                     # read back from the tokens


# --------------------------------------------------------------------------------------------------
# UNet blocks

def norm(ch):
    """GroupNorm with up to 32 groups of at least 4 channels: the largest such count that divides ch
    (so any --base-channels works; 48 has 144-channel skip concatenations, which 32 groups do not
    divide)."""
    return nn.GroupNorm(max(g for g in range(1, max(1, min(32, ch // 4)) + 1) if ch % g == 0), ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim, dropout):
        """tdim = 0: no time embedding (the autoencoder's blocks)."""
        super().__init__()
        self.block1 = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.temb = nn.Linear(tdim, cout) if tdim else None
        self.block2 = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.block2[-1].weight)   # each residual branch starts as identity
        nn.init.zeros_(self.block2[-1].bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):
        h = self.block1(x)
        if self.temb is not None:
            h = h + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class Attention(nn.Module):
    """Multi-head attention; keys/values from `ctx` (cross) or from x itself (self)."""
    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = (
            nn.Linear(dim, dim),
            nn.Linear(ctx_dim, 2 * dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x, ctx, mask=None):          # x (B, N, C), ctx (B, Lc, Cc), mask (B, Lc) True
                                                   # = attend
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        attn_mask = None if mask is None else mask[:, None, None, :]           # (B, 1, 1, Lc)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 attention on the CPU: the kernel's backward is several times slower than in fp32
            # at these shapes (measured in docs/performance.md); the core runs in fp32, the
            # projections around it stay in bf16
            with torch.autocast("cpu", enabled=False):
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   attn_mask=attn_mask)
        else:
            # softmax(q k^T / sqrt(d)) v
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))


class AttnBlock(nn.Module):
    """Self-attention and/or cross-attention to the layout on a (B, C, H, W) map, pre-LN residual
    style. Cross-attention queries get a fixed 2-D sin-cos embedding of the pixel position so that
    they can match location information carried by the layout embeddings."""
    def __init__(self, ch, ctx_dim, heads, self_attn, cross_attn):
        super().__init__()
        self.ln1 = nn.LayerNorm(ch) if self_attn else None
        self.attn1 = Attention(ch, ch, heads) if self_attn else None
        self.ln2 = nn.LayerNorm(ch) if cross_attn else None
        self.attn2 = Attention(ch, ctx_dim, heads) if cross_attn else None
        self.ln3, self.ff = nn.LayerNorm(ch), nn.Sequential(
            nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch)
        )
        if cross_attn:   # the pixel-centre table, once: side i + 0.5 at any resolution (sincos_2d
                         # with scale = side)
            pos = torch.arange(MAX_SIDE, dtype=torch.float64) + 0.5
            # (MAX_SIDE, C/2)
            self.register_buffer("pos_1d", sincos_1d(pos, ch // 2), persistent=False)

    def position_table(self, H, W):
        """The 2-D sin-cos embedding of the pixel centres of an H x W map (HW, C), positions in
        pixels (j + 0.5, i + 0.5): x in the first C/2 channels, y in the rest; on a square map the
        same as sincos_2d of ((j + 0.5) / W, (i + 0.5) / H) with scale H. Read from the table built
        once in float64."""
        if max(H, W) > MAX_SIDE:
            raise ValueError(f"cross-attention on a {H}x{W} map: more than MAX_SIDE = {MAX_SIDE} "
                             f"positions a side")
        C2 = self.pos_1d.shape[1]
        px, py = self.pos_1d[:W][None].expand(H, W, C2), self.pos_1d[:H][:, None].expand(H, W, C2)
        return torch.cat([px, py], -1).reshape(H * W, 2 * C2)

    def forward(self, x, cond):
        B, C, H, W = x.shape
        h = rearrange(x, "b c h w -> b (h w) c")                                  # (B, HW, C)
        if self.attn1 is not None:
            hn = self.ln1(h)
            h = h + self.attn1(hn, hn)
        if self.attn2 is not None:
            pos = self.position_table(H, W).to(h.dtype)                                 # (HW, C)
            h = h + self.attn2(self.ln2(h) + pos, cond["context"], cond["context_mask"])
        h = h + self.ff(self.ln3(h))
        return rearrange(h, "b (h w) c -> b c h w", h=H, w=W)


class UNet(nn.Module):
    def __init__(self, cfg, loc_xy=None):
        super().__init__()
        self.cfg = cfg
        C, tdim, D, nl = (
            cfg.base_channels,
            4 * cfg.base_channels,
            cfg.d_model,
            len(cfg.channel_mults),
        )
        self.encoder = LayoutEncoder(cfg, loc_xy)
        self.time_mlp = nn.Sequential(nn.Linear(C, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        # timestep_embedding's omega
        self.register_buffer("t_freqs", frequencies(C), persistent=False)
        self.conv_in = nn.Conv2d(cfg.in_channels, C, 3, padding=1)

        def attn(ch, level):
            sa, ca = level in cfg.self_attn_levels, level in cfg.cross_attn_levels
            return AttnBlock(ch, D, cfg.heads, sa, ca) if (sa or ca) else None

        # cond="paint": a 1x1 convolution of the painted layout map into the input of every
        # ResBlock, in the order forward() meets them (down, middle, up)
        self.paint, paint_in = nn.ModuleList(), []

        # down path: every ResBlock output is kept as a skip
        self.down, chans, ch = nn.ModuleList(), [C], C
        for lvl, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                paint_in.append(ch)
                self.down.append(nn.ModuleList([ResBlock(ch, C * mult, tdim, cfg.dropout),
                                                attn(C * mult, lvl)]))
                ch = C * mult
                chans.append(ch)
            if lvl < nl - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))      # downsample by 2
                chans.append(ch)
        # middle: ResBlock, self + cross attention, ResBlock
        self.mid1 = ResBlock(ch, ch, tdim, cfg.dropout)
        self.mid_attn = AttnBlock(ch, D, cfg.heads, True, True)
        self.mid2 = ResBlock(ch, ch, tdim, cfg.dropout)
        paint_in += [ch, ch]
        # up path: num_res_blocks + 1 ResBlocks per level, each eating one skip
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(cfg.channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                paint_in.append(ch + chans[-1])
                blocks.append(nn.ModuleList([ResBlock(ch + chans.pop(), C * mult, tdim,
                                                      cfg.dropout),
                                             attn(C * mult, lvl)]))
                ch = C * mult
            upsample = nn.Conv2d(ch, ch, 3, padding=1) if lvl > 0 else nn.Identity()
            self.up.append(nn.ModuleList([blocks, upsample]))
        if cfg.cond == "paint":
            self.paint = nn.ModuleList([nn.Conv2d(D + 2, c, 1) for c in paint_in])
        # decoder features, coarse to fine
        self.feature_channels = [C * m for m in reversed(cfg.channel_mults)]
        # the perception head reads every decoder level and has one query per layout object
        # (docs/paper.md section 3)
        self.mask_head = MaskHead(self.feature_channels, D, cfg.mask_dim) if cfg.mask_dim else None
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t, t, tokens, return_features=False):
        """x_t (B, Cin, S, S), t (B,) long in 0..T-1, tokens (B, L) long -> eps_pred (B, Cin, S, S).
        With return_features: (eps_pred, dict(features=[(B, C_l, S_l, S_l) coarse to fine], objects
        (B, M, D), object_valid (B, M), and mask_logits (B, M, S, S) from the perception head when
        the model has one))."""
        f = self.cfg.down_factor
        if x_t.shape[-1] % f or x_t.shape[-2] % f:
            raise ValueError(f"image size {tuple(x_t.shape[-2:])} is not divisible by the UNet's "
                             f"downsampling factor {f} (channel_mults={self.cfg.channel_mults})")
        if x_t.shape[1] != self.cfg.in_channels:
            raise ValueError(f"input has {x_t.shape[1]} channels, the model was built for "
                             f"{self.cfg.in_channels}")
        cond = self.encoder(tokens)
        # (B, 4C)
        temb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels,
                                                self.t_freqs).to(x_t.dtype))
        painted, k = {}, iter(self.paint)
        if self.paint:   # where the objects are at every resolution: area-averaged from the finest
            S = x_t.shape[-1]
            # (B, M, S, S), (B, 2, S, S)
            inside, uv = box_masks(cond["boxes"], cond["object_valid"], S)
            painted = {S // 2 ** i: (F.avg_pool2d(inside, 2 ** i),
                                     F.avg_pool2d(uv, 2 ** i)) if i else (inside, uv)
                       for i in range(len(self.cfg.channel_mults))}

        def with_layout(h):   # the next ResBlock's input, plus its 1x1 convolution of the painted
                              # map
            return h + painted_conv(next(k), cond["objects"],
                                    *painted[h.shape[-1]]).to(h.dtype) if painted else h
        h = self.conv_in(x_t)
        skips = [h]
        for m in self.down:
            if isinstance(m, nn.Conv2d):
                h = m(h)
            else:
                h = m[0](with_layout(h), temb)
                h = m[1](h, cond) if m[1] is not None else h
            skips.append(h)
        h = self.mid2(with_layout(self.mid_attn(self.mid1(with_layout(h), temb), cond)), temb)
        feats = []
        for blocks, upsample in self.up:
            for res, att in blocks:
                h = res(with_layout(torch.cat([h, skips.pop()], 1)), temb)
                h = att(h, cond) if att is not None else h
            feats.append(h)                                          # decoder feature at this level
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2, mode="nearest"))   # upsample by 2
        eps_pred = self.out(h)
        if return_features:
            aux = dict(features=feats, objects=cond["objects"], object_valid=cond["object_valid"])
            if self.mask_head is not None:
                aux["mask_logits"] = self.mask_head(feats, cond["objects"])    # (B, M, S, S)
            return eps_pred, aux
        return eps_pred
