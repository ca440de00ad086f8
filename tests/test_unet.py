"""The UNet and layout encoder of unet.py: shapes, conditioning wiring, sin-cos initialisation."""
import numpy as np
import pytest
import torch

import data
import diffusion
import unet
from experiments import masks
from conftest import TINY_MODEL

TOK = data.LayoutTokenizer(["circle", "square", "triangle"], bins=8, max_objects=3)


def make(cond="paint", in_channels=3, **kw):
    torch.manual_seed(0)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(TOK, cond=cond, in_channels=in_channels,
                                                **{**TINY_MODEL, **kw}),
                  loc_xy=TOK.location_xy())
    torch.nn.init.normal_(m.out[-1].weight, std=0.1)   # the output conv starts at zero; wake it up
                                                       # for these tests
    return m.eval()


def tokens(*layouts):
    return torch.stack([TOK.encode(torch.tensor(b).reshape(-1, 4),
                                   torch.tensor(l, dtype=torch.long))
                        for b, l in layouts])


A = ([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]], [0, 1])


@pytest.mark.parametrize("S,C,mults",
                         [(8, 3, (1, 2)), (16, 1, (1, 2)), (24, 4, (1, 2, 2)), (32, 3, (1, 2, 2))])
def test_shape_kept_for_sizes_and_channels(S, C, mults):
    m = make(in_channels=C, channel_mults=mults)
    x = torch.randn(2, C, S, S)
    eps, f = m(x, torch.tensor([0, 999]), tokens(A, A), return_features=True)
    assert eps.shape == x.shape
    n = len(mults)
    # coarse to fine
    assert [t.shape[-1] for t in f["features"]] == [S // 2 ** (n - 1 - i) for i in range(n)]
    assert [t.shape[1] for t in f["features"]] == m.feature_channels
    assert f["objects"].shape == (2, TOK.max_objects, 16)


def test_size_not_divisible_is_a_clear_error():
    m = make(channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 3, 18, 18), torch.tensor([3]), tokens(A))


@pytest.mark.parametrize("cond", ["tokens", "paint"])
def test_changing_the_layout_changes_the_output(cond):
    m = make(cond)
    x, t = torch.randn(1, 3, 16, 16).repeat(4, 1, 1, 1), torch.full((4,), 500)
    moved = ([[0.6, 0.1, 0.9, 0.4], [0.5, 0.5, 0.9, 0.8]], [0, 1])     # same classes, one box moved
    other_class = (A[0], [2, 1])                                     # same boxes, one class changed
    with torch.no_grad():
        e = m(x, t, torch.cat([tokens(A, moved, other_class), TOK.null_prompt()[None]]))
    for i in (1, 2, 3):
        assert (e[0] - e[i]).abs().max() > 1e-4


@pytest.mark.parametrize("cond", ["tokens", "paint"])
def test_object_order_does_not_matter(cond):
    """Objects are a set: no per-object position embedding, so permuting them leaves eps_pred
    unchanged."""
    m = make(cond)
    swapped = ([A[0][1], A[0][0]], [A[1][1], A[1][0]])
    x = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        e = m(x, torch.full((2,), 100), tokens(A, swapped))
    assert torch.allclose(e[0], e[1], atol=1e-5)


def test_object_valid_matches_tokenizer_slots_and_null_prompt_is_finite():
    m = make("paint")
    tk = torch.cat([tokens(A, ([[0.2, 0.2, 0.6, 0.6]], [2])), TOK.null_prompt()[None]])
    with torch.no_grad():
        eps, f = m(torch.randn(3, 3, 16, 16), torch.full((3,), 10), tk, return_features=True)
    assert torch.equal(f["object_valid"], TOK.object_slots(tk)[1])
    assert torch.isfinite(eps).all()


def test_location_embeddings_start_from_2d_sincos():
    m = make()
    W = m.encoder.tok_emb.weight.detach()
    xy = TOK.location_xy()
    x, y = xy[:, :1] * 7, xy[:, 1:] * 7                                 # positions in bins (8 bins)
    om = 1 / 10000 ** (torch.arange(4) / 4)                          # MAE frequencies: D/4 per axis
    ref = torch.cat([(x * om).sin(), (x * om).cos(), (y * om).sin(), (y * om).cos()], 1) * 2 ** 0.5
    assert torch.allclose(W[TOK.loc_offset:TOK.loc_offset + len(xy)], ref, atol=1e-5)


def test_sincos_neighbours_are_more_alike_than_far_bins():
    e = unet.sincos_2d(torch.tensor([[0.0, 0.5], [1 / 31, 0.5], [0.5, 0.5], [1.0, 0.5]]), 64, 31)
    cos = torch.nn.functional.cosine_similarity
    assert cos(e[0], e[1], 0) > cos(e[0], e[2], 0) and cos(e[0], e[1], 0) > cos(e[0], e[3], 0)


def test_gradients_reach_encoder_and_unet():
    m = make("paint").train()
    eps = m(torch.randn(2, 3, 16, 16), torch.tensor([5, 600]), tokens(A, A))
    eps.square().mean().backward()
    assert m.encoder.tok_emb.weight.grad.abs().sum() > 0 and m.conv_in.weight.grad.abs().sum() > 0


def test_attention_core_runs_in_fp32_under_cpu_autocast(monkeypatch):
    # docs/performance.md: the CPU's bf16 attention backward is slow, so the core runs in fp32
    # inside autocast; the projections stay bf16 and the result matches the fp32 module up to bf16
    # rounding
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)
    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    m = unet.Attention(64, 32, 4)
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 9, 32)
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    ref = m(x, ctx, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, ctx, mask)
    assert seen == [(torch.float32,) * 3] * 2
    assert y.dtype == torch.bfloat16                       # the output projection ran in bf16
    assert torch.allclose(y.float(), ref, atol=0.02)


def test_the_unet_reads_back_the_boxes_the_tokenizer_wrote():
    """The layout encoder's boxes (data.slot_boxes read with the UNet's config) invert
    LayoutTokenizer.encode: the same boxes as the tokenizer's own decode, each within half a bin of
    the box that was encoded."""
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=3)
    cfg = unet.UNetConfig.for_tokenizer(tok)
    boxes = torch.tensor([[0.1, 0.2, 0.55, 0.9], [0.0, 0.33, 1.0, 0.6]])
    ids = tok.encode(boxes, torch.tensor([1, 0]))[None]
    got = data.slot_boxes(data.object_slots(ids, cfg)[0], cfg)[0]             # (M, 4), slot 3 empty
    assert torch.allclose(got[:2], tok.decode(ids[0])["boxes"])
    assert (got[:2] - boxes).abs().max() <= 0.5 / (tok.bins - 1) + 1e-6


def test_paint_objects_against_a_hand_made_map():
    """A 4 x 4 map, pixel centres at 1/8, 3/8, 5/8, 7/8. Object 0 (embedding [2, -1]) covers columns
    1-2 and rows 1-3, object 1 ([1, 1]) column 2 and rows 0-1, so pixel (row 1, column 2) holds
    their sum; object 2 is an empty slot and paints nothing."""
    objects = torch.tensor([[[2.0, -1.0], [1.0, 1.0], [5.0, 5.0]]])                     # (1, 3, 2)
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 1.0], [0.5, 0.0, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    got = unet.paint_objects(objects, boxes, valid, 4)[0]                              # (4, 4, 4)
    want = torch.zeros(4, 4, 4)
    in0 = torch.zeros(4, 4)
    in0[1:4, 1:3] = 1
    in1 = torch.zeros(4, 4)
    in1[0:2, 2] = 1
    want[0], want[1] = 2 * in0 + 1 * in1, -1 * in0 + 1 * in1
    # u: -1 at the box's left edge, 1 at its right; object 0 is 0.5 wide: centres 3/8, 5/8 -> -0.5,
    # 0.5; object 1 is 0.25 wide: centre 5/8 -> 0
    want[2, 1:4, 1], want[2, 1:4, 2] = -0.5, 0.5
    # v: object 0 is 0.75 tall from 0.25: rows 1..3 -> -2/3, 0, 2/3; object 1 from 0 to 0.5: rows 0,
    # 1 -> -0.5, 0.5
    want[3, 1:4, 1:3] = torch.tensor([-2 / 3, 0.0, 2 / 3])[:, None]
    want[3, 0:2, 2] += torch.tensor([-0.5, 0.5])
    assert torch.allclose(got, want, atol=1e-6)


def test_paint_null_prompt_paints_nothing_and_the_map_reaches_the_unet():
    m = make("paint")
    cond = m.encoder(torch.cat([tokens(A), TOK.null_prompt()[None]]))
    painted = unet.paint_objects(cond["objects"], cond["boxes"], cond["object_valid"], 16)
    assert painted[1].abs().max() == 0 and painted[0].abs().max() > 0
    n_resblocks = 2 * 1 + 2 + 2 * 2           # TINY_MODEL: 2 levels, 1 block each way + 1 up, mid 2
    assert len(m.paint) == n_resblocks and len(make("tokens").paint) == 0
    m.train()
    m(torch.randn(1, 3, 16, 16), torch.tensor([5]), tokens(A)).square().mean().backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in m.paint)


def test_painted_conv_equals_the_conv_of_the_pooled_map():
    """UNet.forward never builds the (B, D + 2, S, S) map: painted_conv computes conv(avg_pool(map))
    from the pooled box masks. Checked against the map itself at full and at half resolution,
    overlapping boxes included."""
    torch.manual_seed(0)
    objects = torch.randn(2, 3, 6)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.4, 0.3, 0.9, 0.9], [0, 0, 1, 1]]).expand(2, 3, 4)
    valid = torch.tensor([[True, True, False], [False, True, True]])
    conv = torch.nn.Conv2d(8, 5, 1)
    full = unet.paint_objects(objects, boxes, valid, 8)
    inside, uv = unet.box_masks(boxes, valid, 8)
    for f in (1, 2):
        pool = (lambda x: torch.nn.functional.avg_pool2d(x, f)) if f > 1 else (lambda x: x)
        assert torch.allclose(unet.painted_conv(conv, objects, pool(inside), pool(uv)),
                              conv(pool(full)), atol=1e-5)


@pytest.mark.parametrize("ch, groups",
                         [(4, 1), (8, 2), (32, 8), (64, 16), (96, 24), (128, 32), (144, 24),
                          (160, 32)])
def test_group_norm_groups_divide_the_channels(ch, groups):
    """Up to 32 groups of >= 4 channels, the largest count that divides ch: 144 (the skip
    concatenation of --base-channels 48) gets 24; the default widths keep the counts their
    checkpoints were trained with."""
    assert unet.norm(ch).num_groups == groups


def test_unet_builds_at_width_48():
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=2)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, base_channels=48, mask_dim=0))
    out = m(torch.zeros(1, 3, 8, 8), torch.tensor([3]), tok.null_prompt()[None])
    assert out.shape == (1, 3, 8, 8)


def test_every_user_of_the_pixel_in_box_rule_agrees():
    """The perception head's box clip (masks.box_pixels), the painted layout (unet.box_masks) and
    the foreground weight (diffusion.foreground_weight) take exactly data.box_pixels' pixels, on
    boxes whose edges fall on pixel centres."""
    # (1, 2, 4), S = 8
    boxes = torch.tensor([[[1 / 16, 3 / 16, 9 / 16, 15 / 16], [0.5, 0.0, 1.0, 0.5]]])
    valid = torch.tensor([[True, True]])
    want = data.box_pixels(boxes, 8)                                                  # (1, 2, 8, 8)
    assert torch.equal(unet.box_masks(boxes, valid, 8)[0].bool(), want)
    assert all(np.array_equal(masks.box_pixels(b.numpy(), 8), w.numpy()) for b,
               w in zip(boxes[0], want[0]))
    fg = diffusion.foreground_weight(boxes, valid, 8)[0, 0]
    assert torch.equal(fg > fg.min(), want[0].any(0))
