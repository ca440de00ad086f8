"""How bench.py measures: FLOPs as torch.utils.flop_counter counts them (plus the CPU
flash-attention kernels its table lacks), model FLOPs utilisation against the best dense kernel of
the same dtype, and timing in alternating rounds with the median kept. `python -m tools.bench` uses them;
tests/test_flops.py checks them by hand. """
import statistics
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)


def mfu(step_flops_per_img, img_s, peak_flops):
    """Model FLOPs utilisation: the FLOPs a training step executes per image (forward and backward,
    as counted by count_flops(grad=True)) times images per second, over the peak FLOP/s of the same
    dtype."""
    return step_flops_per_img * img_s / peak_flops


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kw):    # FlopCounterMode passes shapes, not tensors
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kw):
    return sdpa_backward_flop_count(grad_out, q, k, v)        # dq, dk, dv and the recomputed scores


def count_flops(fn, grad=False):
    """FLOPs of fn() as FlopCounterMode counts them, plus the CPU flash-attention kernels its table
    lacks. grad=False runs fn under no_grad (a forward); grad=True counts what fn executes, backward
    included."""
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    }
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return fc.get_total_flops()


def growth(values):
    """Ratios to the first entry, e.g. the cost per image as S doubles: [1.0, 3.9, 16.2]."""
    return [round(v / values[0], 2) for v in values]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns, device, rounds, round_s=1.5):
    """Median seconds per call of each function in fns {name: fn}. A warm-up call first (its time is
    returned: the compile cost where there is one), a second call sizes the rounds (about round_s; 3
    rounds at most for calls over 2 s), then rounds that alternate between the functions. Returns
    {name: (median s per call, warm-up s)}."""
    def timed(fn, n=1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n
    warm = {k: timed(fn) for k, fn in fns.items()}
    est = {k: timed(fn) for k, fn in fns.items()}
    calls = {k: max(1, round(round_s / s)) for k, s in est.items()}
    times = {k: [] for k in fns}
    for _ in range(rounds if max(est.values()) < 2 else min(rounds, 3)):
        for k, fn in fns.items():
            times[k].append(timed(fn, calls[k]))
    return {k: (statistics.median(v), warm[k]) for k, v in times.items()}


def dense_kernels(dtype, device):
    """The dense kernels the peak is taken over, name -> (fn, FLOPs): torch.matmul (MKL / cuBLAS) at
    three sizes and convolutions (oneDNN / cuDNN, which need not be as fast or as slow as the matmul
    library: on one AMD CPU here the UNet's 3x3 convolutions ran faster than MKL's 2048 x 2048
    matmul, and an MFU of 122% came out) as a 1x1 and a 3x3 kernel at the wide config's shapes."""
    dt, out = DTYPES[dtype], {}
    for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048, 4096)):
        a, b = (torch.randn(n, n, device=device).to(dt) for _ in range(2))
        out[f"matmul {n}"] = ((lambda a=a, b=b: torch.matmul(a, b)), 2 * n ** 3)
    for k, (B, C, S) in ((1, (8, 512, 32)), (3, (32, 128, 32))):
        x = torch.randn(B, C, S, S, device=device).to(dt)
        w = torch.randn(C, C, k, k, device=device).to(dt)
        out[f"conv{k}x{k} {C}ch {S}px B{B}"] = ((lambda x=x, w=w,
                                                 k=k: nn.functional.conv2d(x, w, padding=k // 2)),
                                                2 * B * S * S * C * C * k * k)
    return out


def dense_peak(dtype, device, reps=4):
    """The peak FLOP/s that MFU is measured against: the best of `reps` timed calls (after a
    warm-up) of every dense kernel of dense_kernels, the best kernel counts. -> (peak FLOP/s,
    {kernel: FLOP/s})"""
    rates = {}
    for name, (fn, flops) in dense_kernels(dtype, device).items():
        best = float("inf")
        for _ in range(reps + 1):                # the first call is a warm-up
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rates[name] = flops / best
    return max(rates.values()), rates
