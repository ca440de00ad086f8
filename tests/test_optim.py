"""optim.py: warm-up then cosine decay, batches that cover each epoch and split across ranks, and
Muon (its Newton-Schulz iteration against the SVD's polar factor, its update rule by hand, its AdamW
groups against torch's AdamW, which parameters it takes); the EMA formula of train.py."""
import pytest
import torch

import optim
import train


def test_ema_update_formula():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ref = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    train.ema_update(a, b, 0.9)
    assert all(torch.allclose(p, r) for p, r in zip(a.parameters(), ref))


def test_lr_warmup_then_cosine():
    cfg = train.TrainConfig(lr=1.0, warmup=10, min_lr_frac=0.1)
    assert optim.lr_at(cfg, 0, 0.0) == pytest.approx(0.1) and optim.lr_at(
        cfg, 9, 0.0
    ) == pytest.approx(1.0)
    assert optim.lr_at(cfg, 50, 0.5) == pytest.approx(0.55) and optim.lr_at(
        cfg, 99, 1.0
    ) == pytest.approx(0.1)


def test_warmup_cosine_by_hand():
    """lr 2, warm-up 4: 0.5, 1, 1.5, 2 over the warm-up; then 2 * (1 + cos(pi p)) / 2: 1 at p = 0.5,
    0 at p = 1 (the floor min_frac lifts the end to lr * min_frac)."""
    assert [optim.warmup_cosine(2.0, s, 4, 0.0) for s in range(4)] == pytest.approx(
        [0.5, 1.0, 1.5, 2.0]
    )
    assert optim.warmup_cosine(2.0, 10, 4, 0.5) == pytest.approx(1.0)
    assert optim.warmup_cosine(2.0, 10, 4, 1.0) == pytest.approx(0.0)
    # past the end: the floor
    assert optim.warmup_cosine(2.0, 10, 4, 2.0, min_frac=0.25) == pytest.approx(0.5)


def test_batches_cover_each_epoch_and_split_across_ranks():
    n, B = 10, 5
    seen = [i for s in range(2) for i in optim.batch_indices(n, B, s, seed=3)]
    assert sorted(seen) == list(range(n))
    both = optim.batch_indices(n, B, 0, 3, rank=0, world=2) + optim.batch_indices(
        n, B, 0, 3, rank=1, world=2
    )
    assert sorted(both) == list(range(n))


# --------------------------------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (3, 32, 288)])
def test_newton_schulz_approaches_the_polar_factor_of_the_svd(shape):
    """G = U S V^T -> about U V^T: singular values near 1 (Muon's quintic leaves them in about
    0.68-1.14, not at 1) and the direction of U V^T (cosine > 0.98); a batch is the matrices one by
    one."""
    torch.manual_seed(0)
    G = torch.randn(*shape)
    O = optim.newton_schulz(G)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.6 and s.max() < 1.25
    cos = (O * polar).sum((-2, -1)) / (O.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.98).all()
    if G.dim() == 3:
        assert torch.allclose(O[1], optim.newton_schulz(G[1]), atol=1e-6)


def test_newton_schulz_in_bf16_stays_near_the_fp32_result():
    torch.manual_seed(1)
    G = torch.randn(48, 80)
    o32, o16 = optim.newton_schulz(G), optim.newton_schulz(G, dtype=torch.bfloat16)
    assert o16.dtype == torch.bfloat16 and (o16.float() - o32).norm() / o32.norm() < 0.05


def test_one_muon_step_by_hand():
    """From zero momentum: m = (1 - beta) g, u = (1 - beta) g + beta m, O = newton_schulz(u)
    (scale-free, so that of g), W <- (1 - lr' wd) W - lr' 0.2 sqrt(max(out, in k k)) O with lr' = lr
    lr_scale; a conv kernel as (out, in k k). The update's RMS is about 0.2 lr', AdamW's (Moonshot's
    rule)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    w0, g = w.detach().clone(), torch.randn(16, 8, 3, 3)
    w.grad = g.clone()
    opt = optim.Muon([dict(params=[w], muon=True, lr_scale=2.0, weight_decay=0.1)], lr=0.01)
    opt.step()
    O = optim.newton_schulz(g.reshape(16, 72)).reshape(16, 8, 3, 3)
    want = w0 * (1 - 0.02 * 0.1) - 0.02 * 0.2 * 72 ** 0.5 * O
    assert torch.allclose(w.detach(), want, atol=1e-6)
    rms = (want - w0 * (1 - 0.02 * 0.1)).square().mean().sqrt()
    assert 0.7 * 0.2 * 0.02 < rms < 1.2 * 0.2 * 0.02


def test_muons_adamw_groups_match_torchs_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    mine = optim.Muon([dict(params=[a.weight], weight_decay=0.01),
                       dict(params=[a.bias], weight_decay=0.0)],
                      lr=0.003)
    ref = torch.optim.AdamW([dict(params=[b.weight], weight_decay=0.01),
                             dict(params=[b.bias], weight_decay=0.0)],
                            lr=0.003, betas=(0.9, 0.99))
    for _ in range(4):
        x = torch.randn(7, 5)
        for m, o in ((a, mine), (b, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_and_the_ends_to_adamw():
    import data
    import unet
    from conftest import TINY_MODEL
    tok = data.LayoutTokenizer(["a", "b"], bins=8, max_objects=3)
    model = unet.UNet(unet.UNetConfig.for_tokenizer(tok, **TINY_MODEL))
    cfg = train.TrainConfig(optimizer="muon", muon_lr_scale=4.0)
    opt = optim.make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for p in opt.param_groups[0]["params"]]
    adamw = [names[id(p)] for g in opt.param_groups[1:] for p in g["params"]]
    assert opt.param_groups[0]["muon"] and opt.param_groups[0]["lr_scale"] == 4.0
    assert sorted(muon + adamw) == sorted(names.values())
    assert {"encoder.tok_emb.weight", "encoder.role_emb.weight", "conv_in.weight",
            "out.2.weight"} <= set(adamw)
    assert all(model.get_parameter(n).dim() >= 2 for n in muon) and "down.0.0.block1.2.weight" in muon
    assert all(model.get_parameter(n).dim() < 2 or n.startswith(optim.ADAMW_ONLY) for n in adamw)
