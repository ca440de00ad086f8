"""bench.py's pure helpers against hand-computed values (no timing assertions)."""
import torch
import torch.nn.functional as F

import bench


def test_mfu_and_growth_arithmetic():
    # 1.8 GFLOPs per image for the whole step, 50 img/s: 1.8e9 * 50 = 90 GFLOP/s of a 300 GFLOP/s peak
    assert abs(bench.mfu(1.8e9, 50.0, 300e9) - 0.3) < 1e-12
    assert bench.growth([2.0, 5.0, 8.0]) == [1.0, 2.5, 4.0]


def test_count_flops_of_a_linear_layer():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert bench.count_flops(lambda: lin(x)) == 2 * 7 * 5 * 3          # 2 * in * out * batch


def test_count_flops_includes_attention():
    """q k^T and (softmax) v: 2 * (2 * s_q * s_k * d) per head, whichever CPU kernel runs it."""
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 3 * 2 * (2 * 4 * 6 * 8)


def test_step_flops_count_the_backward_as_executed():
    """A 2-layer MLP, batch 3: forward 2 (7*5 + 5*2) * 3 FLOPs; backward: weight gradients of both layers and the
    input gradient of the second only (the input needs none): 2 (7*5 + 5*2) * 3 + 2 * 5*2 * 3."""
    mlp = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 2))
    x = torch.randn(3, 7)
    fwd = 2 * (7 * 5 + 5 * 2) * 3
    assert bench.count_flops(lambda: mlp(x)) == fwd
    assert bench.count_flops(lambda: mlp(x).sum().backward(), grad=True) == fwd + fwd + 2 * 5 * 2 * 3


def test_count_flops_includes_attention_backward():
    """The CPU flash-attention backward: dq, dk, dv and the recomputed q k^T: 2.5x the forward's 2 products."""
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (4, 6, 6))
    fwd = 2 * 3 * 2 * (2 * 4 * 6 * 8)
    got = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward(), grad=True)
    assert got == fwd + fwd * 5 // 2


class StandInUNet(torch.nn.Module):
    """Called like diffusers' UNet2DConditionModel; one 3x3 convolution plus the mean of the context."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        return (self.conv(x) + encoder_hidden_states.mean((1, 2))[:, None, None, None],)


def test_peer_row_runs_with_a_stand_in_peer():
    """Bench.peer end to end (sizing, FLOPs on the real modules, timing of both, the table line) without diffusers:
    the stand-in's FLOPs are our encoder's plus its convolution's 2 * 9 * 3 * 3 * S * S per image."""
    a = bench.parse_args(["--quick", "--batch", "2", "--rounds", "1", "--round-s", "0.01", "--device", "cpu"])
    bn = bench.Bench(a)
    S = 8

    def build(encoder, target, S_, device):
        assert S_ == S and target > 0
        return "stand-in", dict(kind="conv"), bench.PeerUNet(encoder, StandInUNet())
    bn.peer(S=S, build=build)
    p = bn.res["peer"]
    tokens = bn.batch(2, S)[0]["tokens"]
    ours = bn.model(mask_dim=0)
    enc = bench.count_flops(lambda: ours.encoder(tokens)) / 2
    assert p["gflops_peer"] == round((enc + 2 * 9 * 3 * 3 * S * S) / 1e9, 4)
    assert p["gflops_ours"] == round(bench.count_flops(lambda: ours(torch.randn(2, 3, S, S), torch.zeros(
        2, dtype=torch.long), tokens)) / 2 / 1e9, 4)
    assert set(p["ratio"]) == {"fp32", "bf16"} and all(v > 0 for v in p["img_s"].values())
    r = dict(hardware=dict(cpu="x", cores=2, torch="t", device="cpu", loadavg_start=[0.0], loadavg_end=[0.0]),
             settings=dict(batch=2), date="d", peak_flops={"fp32": 1e9}, peak_kernel={"fp32": "matmul 1024"},
             train={}, peer=p, sampling_s_per_img={}, scaling={}, peak_rss_mb=1, peak_rss=dict(steps=1),
             train_img_s_bf16=1.0, mfu_bf16=0.1, peer_ratio=p["ratio"]["bf16"], sampler="s", sample_s_per_img=0.1,
             seconds=1.0)
    assert "peer: stand-in:" in bench.table(r) and "ours/peer" in bench.table(r)


def test_dense_kernels_flop_counts_match_the_counter():
    """Each peak kernel's FLOPs as dense_kernels states them equal FlopCounterMode's count of the same call."""
    for name, (fn, flops) in bench.dense_kernels("fp32", torch.device("cpu")).items():
        if "4096" in name:
            continue                             # same formula as 1024 / 2048, and slow to count
        assert bench.count_flops(fn) == flops, name
