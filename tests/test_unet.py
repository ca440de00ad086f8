"""The UNet and layout encoder of unet.py: shapes, conditioning wiring, sin-cos initialisation."""
import pytest
import torch

import data
import unet
from conftest import TINY_MODEL

TOK = data.LayoutTokenizer(["circle", "square", "triangle"], bins=8, max_objects=3)


def make(cond="object", in_channels=3, **kw):
    torch.manual_seed(0)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(TOK, cond=cond, in_channels=in_channels, **{**TINY_MODEL, **kw}),
                  loc_xy=TOK.location_xy())
    torch.nn.init.normal_(m.out[-1].weight, std=0.1)   # the output conv starts at zero; wake it up for these tests
    return m.eval()


def tokens(*layouts):
    return torch.stack([TOK.encode(torch.tensor(b).reshape(-1, 4), torch.tensor(l, dtype=torch.long))
                        for b, l in layouts])


A = ([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8]], [0, 1])


@pytest.mark.parametrize("S,C,mults", [(8, 3, (1, 2)), (16, 1, (1, 2)), (24, 4, (1, 2, 2)), (32, 3, (1, 2, 2))])
def test_shape_kept_for_sizes_and_channels(S, C, mults):
    m = make(in_channels=C, channel_mults=mults)
    x = torch.randn(2, C, S, S)
    eps, f = m(x, torch.tensor([0, 999]), tokens(A, A), return_features=True)
    assert eps.shape == x.shape
    n = len(mults)
    assert [t.shape[-1] for t in f["features"]] == [S // 2 ** (n - 1 - i) for i in range(n)]   # coarse to fine
    assert [t.shape[1] for t in f["features"]] == m.feature_channels
    assert f["objects"].shape == (2, TOK.max_objects, 16)


def test_size_not_divisible_is_a_clear_error():
    m = make(channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 3, 18, 18), torch.tensor([3]), tokens(A))


@pytest.mark.parametrize("cond", ["object", "tokens"])
def test_changing_the_layout_changes_the_output(cond):
    m = make(cond)
    x, t = torch.randn(1, 3, 16, 16).repeat(4, 1, 1, 1), torch.full((4,), 500)
    moved = ([[0.6, 0.1, 0.9, 0.4], [0.5, 0.5, 0.9, 0.8]], [0, 1])         # same classes, one box moved
    other_class = (A[0], [2, 1])                                            # same boxes, one class changed
    with torch.no_grad():
        e = m(x, t, torch.cat([tokens(A, moved, other_class), TOK.null_prompt()[None]]))
    for i in (1, 2, 3):
        assert (e[0] - e[i]).abs().max() > 1e-4


@pytest.mark.parametrize("cond", ["object", "tokens"])
def test_object_order_does_not_matter(cond):
    """Objects are a set: no per-object position embedding, so permuting them leaves eps_pred unchanged."""
    m = make(cond)
    swapped = ([A[0][1], A[0][0]], [A[1][1], A[1][0]])
    x = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        e = m(x, torch.full((2,), 100), tokens(A, swapped))
    assert torch.allclose(e[0], e[1], atol=1e-5)


def test_object_valid_matches_tokenizer_slots_and_null_prompt_is_finite():
    m = make("object")
    tk = torch.cat([tokens(A, ([[0.2, 0.2, 0.6, 0.6]], [2])), TOK.null_prompt()[None]])
    with torch.no_grad():
        eps, f = m(torch.randn(3, 3, 16, 16), torch.full((3,), 10), tk, return_features=True)
    assert torch.equal(f["object_valid"], TOK.object_slots(tk)[1])
    assert torch.isfinite(eps).all()


def test_location_embeddings_start_from_2d_sincos():
    m = make()
    W = m.encoder.tok_emb.weight.detach()
    xy = TOK.location_xy()
    x, y = xy[:, :1] * 7, xy[:, 1:] * 7                                     # positions in bins (8 bins)
    om = 1 / 10000 ** (torch.arange(4) / 4)                                 # MAE frequencies: D/4 per axis
    ref = torch.cat([(x * om).sin(), (x * om).cos(), (y * om).sin(), (y * om).cos()], 1) * 2 ** 0.5
    assert torch.allclose(W[TOK.loc_offset:TOK.loc_offset + len(xy)], ref, atol=1e-5)


def test_sincos_neighbours_are_more_alike_than_far_bins():
    e = unet.sincos_2d(torch.tensor([[0.0, 0.5], [1 / 31, 0.5], [0.5, 0.5], [1.0, 0.5]]), 64, 31)
    cos = torch.nn.functional.cosine_similarity
    assert cos(e[0], e[1], 0) > cos(e[0], e[2], 0) and cos(e[0], e[1], 0) > cos(e[0], e[3], 0)


def test_axis_tokenizer_leaves_the_unused_half_random():
    tok = data.LayoutTokenizer(["a"], bins=4, max_objects=2, location="axis")
    torch.manual_seed(0)
    m = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL), loc_xy=tok.location_xy())
    W = m.encoder.tok_emb.weight.detach()
    x_tok = W[tok.loc_offset + 2]                                           # x = 2/3, y unused
    assert torch.allclose(x_tok[:8], unet.sincos_1d(torch.tensor([2.0]), 8)[0] * 2 ** 0.5, atol=1e-6)
    assert not torch.allclose(x_tok[8:], unet.sincos_1d(torch.tensor([0.0]), 8)[0] * 2 ** 0.5)


def test_gradients_reach_encoder_and_unet():
    m = make("object").train()
    eps = m(torch.randn(2, 3, 16, 16), torch.tensor([5, 600]), tokens(A, A))
    eps.square().mean().backward()
    assert m.encoder.tok_emb.weight.grad.abs().sum() > 0 and m.conv_in.weight.grad.abs().sum() > 0


def test_attention_core_runs_in_fp32_under_cpu_autocast(monkeypatch):
    # docs/performance.md: the CPU's bf16 attention backward is slow, so the core runs in fp32 inside autocast;
    # the projections stay bf16 and the result matches the fp32 module up to bf16 rounding
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
