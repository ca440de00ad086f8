"""tools/flops.py: MFU and growth arithmetic, FLOP counts of linear layers, attention (forward and
backward) and the dense kernels against hand-computed values (no timing assertions)."""
import torch
import torch.nn.functional as F

from tools import flops


def test_mfu_and_growth_arithmetic():
    # 1.8 GFLOPs per image for the whole step, 50 img/s: 1.8e9 * 50 = 90 GFLOP/s of a 300 GFLOP/s
    # peak
    assert abs(flops.mfu(1.8e9, 50.0, 300e9) - 0.3) < 1e-12
    assert flops.growth([2.0, 5.0, 8.0]) == [1.0, 2.5, 4.0]


def test_count_flops_of_a_linear_layer():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert flops.count_flops(lambda: lin(x)) == 2 * 7 * 5 * 3          # 2 * in * out * batch


def test_count_flops_includes_attention():
    """q k^T and (softmax) v: 2 * (2 * s_q * s_k * d) per head, whichever CPU kernel runs it."""
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    assert flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 3 * 2 * (
        2 * 4 * 6 * 8
    )


def test_step_flops_count_the_backward_as_executed():
    """A 2-layer MLP, batch 3: forward 2 (7*5 + 5*2) * 3 FLOPs; backward: weight gradients of both
    layers and the input gradient of the second only (the input needs none): 2 (7*5 + 5*2) * 3 + 2 *
    5*2 * 3."""
    mlp = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 2))
    x = torch.randn(3, 7)
    fwd = 2 * (7 * 5 + 5 * 2) * 3
    assert flops.count_flops(lambda: mlp(x)) == fwd
    assert flops.count_flops(lambda: mlp(x).sum().backward(),
                             grad=True) == fwd + fwd + 2 * 5 * 2 * 3


def test_count_flops_includes_attention_backward():
    """The CPU flash-attention backward: dq, dk, dv and the recomputed q k^T: 2.5x the forward's 2
    products."""
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (4, 6, 6))
    fwd = 2 * 3 * 2 * (2 * 4 * 6 * 8)
    got = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward(),
                            grad=True)
    assert got == fwd + fwd * 5 // 2


def test_dense_kernels_flop_counts_match_the_counter():
    """Each peak kernel's FLOPs as dense_kernels states them equal FlopCounterMode's count of the
    same call."""
    for name, (fn, stated) in flops.dense_kernels("fp32", torch.device("cpu")).items():
        if "4096" in name:
            continue                             # same formula as 1024 / 2048, and slow to count
        assert flops.count_flops(fn) == stated, name
