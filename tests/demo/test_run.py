"""`scalingattn demo` (scaling_compiler.demo.run): the summary, the one-call timing, the CLI's hand-over."""
import types

import torch

from scaling_compiler import ScalingAttnBackend, cli
from scaling_compiler.demo import run, video_dit
from scaling_compiler.kernels.bitmask import BLOCK_SIZE


def site(kind, status, reason, name):
    return types.SimpleNamespace(kind=kind, status=status, reason=reason, name=name)


def test_summary_says_which_sites_stay_dense_and_why():
    reports = [types.SimpleNamespace(sites=[site("self", "sparse", "WEST", "a1"),
                                            site("cross", "dense", "cross-attention", "a2"),
                                            site("self", "dense", "sparse 0.645 ms is not below dense 0.332 ms", "b1"),
                                            site("self", "dense", "sparse 0.646 ms is not below dense 0.332 ms", "c1"),
                                            site("cross", "dense", "cross-attention", "b2")]),
               types.SimpleNamespace(sites=[site("self", "sparse", "WEST", "a1")])]  # a later graph: a1 again
    text = run.sites_summary(reports)
    assert text.startswith("scalingattn made 1 of 5 attention sites sparse and kept 4 dense: ")
    # most frequent reason first, counted once whatever its figures, with the first site's own reason
    assert text.endswith("2 cross-attention sites, why: cross-attention; "
                         "2 self-attention sites, why: sparse 0.645 ms is not below dense 0.332 ms")
    assert run.sites_summary([types.SimpleNamespace(sites=[site("self", "sparse", "WEST", "a1")])]).endswith(
        "made 1 of 1 attention sites sparse and kept none dense")


def test_summary_reads_a_real_report():
    model = video_dit.build_model(video_dit.TinyVideoDiTConfig(num_attention_heads=2, attention_head_dim=32,
                                                               ffn_dim=64, num_layers=1, text_dim=32, freq_dim=32))
    backend = ScalingAttnBackend(density=0.5, compiler="eager", masks="window_3d", schedule="uniform")
    with torch.no_grad():
        torch.compile(model, backend=backend)(*video_dit.example_inputs(model.config, frames=2, height=32,
                                                                        width=32))
    [cross] = [s for s in backend.report.sites if s.kind == "cross"]
    assert run.sites_summary(backend.reports).endswith(f"kept 1 dense: 1 cross-attention site, why: {cross.reason}")


def test_attention_times_runs_the_op_at_the_density():
    times = run.attention_times((1, 2, 8 * BLOCK_SIZE, 32), 0.25, "cpu", torch.float32, repeats=1)
    assert times["sparse_ms"] > 0 and times["dense_ms"] > 0
    # 8 x 8 blocks per head, each kept with probability 0.25, the diagonal always: about 0.25 + 0.75 / 8
    assert 0.125 <= times["density"] <= 0.6


def test_cli_hands_the_flags_to_run_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "run_demo", lambda **kwargs: calls.append(kwargs) or 0)
    assert cli.main(["demo", "--density", "0.1", "--steps", "3", "--repeats", "1", "--out", "x"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [dict(density=0.1, steps=3, repeats=1, out="x"),
                     dict(density=0.25, steps=None, repeats=3, out="scalingattn-demo")]
