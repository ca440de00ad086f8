"""bench.py's pure helpers against hand-computed values (no timing assertions)."""
import torch
import torch.nn.functional as F

import bench


def test_mfu_and_growth_arithmetic():
    # 0.6 GFLOPs forward, 50 img/s: 3 * 0.6e9 * 50 = 90 GFLOP/s of a 300 GFLOP/s peak
    assert abs(bench.mfu(0.6e9, 50.0, 300e9) - 0.3) < 1e-12
    assert bench.growth([2.0, 5.0, 8.0]) == [1.0, 2.5, 4.0]


def test_count_flops_of_a_linear_layer():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    assert bench.count_flops(lambda: lin(x)) == 2 * 7 * 5 * 3          # 2 * in * out * batch


def test_count_flops_includes_attention():
    """q k^T and (softmax) v: 2 * (2 * s_q * s_k * d) per head, whichever CPU kernel runs it."""
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 3 * 2 * (2 * 4 * 6 * 8)
