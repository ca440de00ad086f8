"""tools/bench.py: the peer row and the table with a stand-in peer (no timing assertions), and its
errors."""
import subprocess

import pytest
import torch

import config
from tools import bench, flops


class StandInUNet(torch.nn.Module):
    """Called like diffusers' UNet2DConditionModel; one 3x3 convolution plus the mean of the
    context."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        return (self.conv(x) + encoder_hidden_states.mean((1, 2))[:, None, None, None],)


def test_peer_row_runs_with_a_stand_in_peer():
    """Bench.peer end to end (sizing, FLOPs on the real modules, timing of both, the table line)
    without diffusers: the stand-in's FLOPs are our encoder's plus its convolution's 2 * 9 * 3 * 3 *
    S * S per image."""
    a = bench.parse_args(["--quick", "--batch", "2", "--rounds", "1", "--round-s", "0.01",
                          "--device", "cpu"])
    bn = bench.Bench(a)
    S = 8

    def build(encoder, target, S_, device):
        assert S_ == S and target > 0
        return "stand-in", dict(kind="conv"), bench.PeerUNet(encoder, StandInUNet())
    bn.peer(S=S, build=build)
    p = bn.res["peer"]
    tokens = bn.batch(2, S)[0]["tokens"]
    ours = bn.model(mask_dim=0)
    enc = flops.count_flops(lambda: ours.encoder(tokens)) / 2
    assert p["gflops_peer"] == round((enc + 2 * 9 * 3 * 3 * S * S) / 1e9, 4)
    assert p["gflops_ours"] == round(flops.count_flops(lambda: ours(torch.randn(2, 3, S, S), torch.zeros(
        2, dtype=torch.long), tokens)) / 2 / 1e9, 4)
    # fp32 always; bf16 only where this CPU has it natively (elsewhere it is emulated and not timed)
    native = config.resolve_dtype("auto", torch.device("cpu"))[0] == "bf16"
    assert set(p["ratio"]) == {"fp32"} | ({"bf16"} if native else set())
    assert all(v > 0 for v in p["img_s"].values())
    r = dict(hardware=dict(cpu="x", cores=2, torch="t", device="cpu", loadavg_start=[0.0],
                           loadavg_end=[0.0]),
             settings=dict(batch=2), date="d", peak_flops={"fp32": 1e9},
             peak_kernel={"fp32": "matmul 1024"},
             train={}, peer=p, sampling_s_per_img={}, scaling={}, peak_rss_mb=1,
             peak_rss=dict(steps=1),
             headline_dtype=bn.headline, train_img_s=1.0, mfu=0.1, peer_ratio=p["ratio"][bn.headline],
             sampler="s",
             sample_s_per_img=0.1,
             seconds=1.0)
    assert "peer: stand-in:" in bench.table(r) and "ours/peer" in bench.table(r)


def test_optimizer_rows_time_both_optimizers_and_their_step_alone():
    """Bench.optimizers: one row per optimizer and dtype, the share being the optimiser's step time
    over the whole step's (B / img/s), and the default step's optimizer is Muon. No timing
    assertions: a loaded machine makes any ordering of the two times possible."""
    a = bench.parse_args(["--quick", "--batch", "2", "--rounds", "1", "--round-s", "0.01",
                          "--device", "cpu"])
    bn = bench.Bench(a)
    bn.dtypes = ["fp32"]
    bn.optimizers(S=8)
    rows = bn.res["optimizer"]
    assert set(rows) == {"adamw fp32", "muon fp32"}
    assert all(v["opt_ms"] > 0 and v["img_s"] > 0 for v in rows.values())
    assert all(v["share"] == pytest.approx(v["opt_ms"] / 1e3 * v["img_s"] / 2, rel=0.02, abs=2e-3)
               for v in rows.values())
    step = bench.make_step(bn.model(), *bn.batch(2, 8), "fp32", bn.dev)
    assert type(step.opt).__name__ == "Muon"                     # the default's optimizer


def test_a_failed_peak_memory_child_is_a_runtime_error_with_its_stderr(monkeypatch):
    bn = bench.Bench(bench.parse_args(["--quick", "--device", "cpu"]))
    monkeypatch.setattr(bench.shapes, "build_if_missing", lambda name: None)
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd,
                        **kw: subprocess.CompletedProcess(cmd, 3, "", "boom\n"))
    with pytest.raises(RuntimeError,
                       match=r"peak-memory run \(detdiff.py --stage generator\) exited 3:\nboom"):
        bn.peak_rss(2)


def test_bench_main_turns_a_bad_device_into_one_line(capsys):
    with pytest.raises(config.DataError, match="^--device gpu0: not a device"):
        bench.parse_args(["--device", "gpu0"])
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "gpu0"])
    assert str(e.value).startswith("error: --device gpu0: not a device") and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, dtypes", [(set(), ["fp32"]), ({"avx512_bf16"}, ["fp32", "bf16"])])
def test_bench_times_bf16_only_where_the_cpu_has_it(monkeypatch, flags, dtypes):
    """A CPU without AVX-512 BF16 / AMX would emulate bf16 (its 4096 x 4096 peak matmul alone ran
    for half an hour): no bf16 rows there, and the headline is the fp32 a run on it trains in."""
    monkeypatch.setattr(bench.config, "cpu_flags", lambda: flags)
    bn = bench.Bench(bench.parse_args(["--quick", "--device", "cpu"]))
    assert bn.dtypes == dtypes and bn.headline == dtypes[-1]
