"""diffusers' Ulysses context parallelism (2 processes, gloo, a custom CPU mesh) on a small Wan.

The compiled model under Ulysses 2 must equal the single-process compiled model with the same
masks: each rank's site holds H/2 heads over the whole sequence, and its masks are its heads' slice
of the whole model's plan, with the heads in the model's order or permuted for balance.

On the CPU, `context_parallel.enable_ulysses` works around diffusers' device choice
(`rank % torch.accelerator.device_count()`, a division by 0 without an accelerator).
"""
import os
import pathlib
import socket
import tempfile
import time
import traceback

import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel
from scaling_compiler.demo import zoo
from scaling_compiler.policies.west_fast.parallel import RankTimes, balance, rank_times

GRID = (3, 24, 24)  # 3 x 12 x 12 = 432 tokens after patchify: 216 per rank
CONFIG = dict(num_attention_heads=4, attention_head_dim=32)  # 2 heads per rank
TIMESTEPS = (999.0, 500.0, 1.0)
# fp32: the ranks compute the same products on their sequence chunks; only the data moves differently
# (eager Ulysses matched single-process exactly here); 1e-5 is ~10x what was seen
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
CASES = {
    "density 1": {"density": 1.0},
    "density 1, permuted": {"density": 1.0, "balance_heads": True},
    "density 0.5": {"density": 0.5, "schedule": "uniform"},
    "density 0.5, permuted": {"density": 0.5, "schedule": "uniform", "balance_heads": True},
    "FAST 0.25, permuted": {"density": 0.25, "balance_heads": True},
}


def _tiny_wan():
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel", CONFIG)
    model.set_attention_backend("native")  # diffusers' context parallelism needs a CP-capable backend
    torch.manual_seed(1)
    return model, zoo.example_inputs("WanTransformer3DModel", model, GRID)


def _compile(model, inputs, options, cache=False):
    torch._dynamo.reset()
    backend = ScalingAttnBackend(cost_model=CostModel.ideal("test: every site sparse"), compiler="aot_eager",
                                 cache=cache, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**inputs)[0]
    return backend.report, out


def _masks(report, name, heads=None):
    masks = [report.plans[name].masks_at(t) for t in TIMESTEPS]
    return [m if heads is None else m[list(heads)] for m in masks]


def _worker(rank: int, port: int, cache_dir: str, results) -> None:
    try:
        results.put((rank, _compare(rank, port, cache_dir)))
    except BaseException:  # noqa: BLE001  (the parent reports it)
        results.put((rank, traceback.format_exc()))


def _compare(rank: int, port: int, cache_dir: str) -> dict:
    import torch.distributed as dist

    from scaling_compiler.context_parallel import enable_ulysses, ignore_warning_once

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, inputs = _tiny_wan()
    ignore_warning_once()
    single = {case: _compile(model, inputs, options) for case, options in CASES.items()}
    enable_ulysses(model, 2)
    with torch.no_grad():
        model(**inputs)  # diffusers' hooks read the forward's signature on first use: not traceable
    outcome = {}
    for case, options in CASES.items():
        start = time.perf_counter()
        report, out = _compile(model, inputs, options)
        reference, expected = single[case]
        sites = {site.name: site for site in report.sites if site.kind == "self"}
        outcome[case] = dict(
            seconds=time.perf_counter() - start, max_error=(out - expected).abs().max().item(),
            close=torch.allclose(out, expected, **TOLERANCE),
            status={name: site.status for name, site in sites.items()},
            shapes={name: site.shape for name, site in sites.items()},
            heads={name: site.model_heads for name, site in sites.items()},
            masks_are_slices={name: all(torch.equal(a, b) for a, b in zip(
                _masks(report, name), _masks(reference, name, site.model_heads))) for name, site in sites.items()},
            ulysses=report.to_dict().get("ulysses"),
        )
    outcome["cache"] = _cached_twice(model, inputs, cache_dir, single["density 0.5"][0])
    dist.destroy_process_group()
    return outcome


def _cached_twice(model, inputs, cache_dir: str, reference) -> dict:
    """Two compiles with the cache on, in an empty cache folder shared by the ranks."""
    import torch.distributed as dist

    os.environ["SCALINGATTN_CACHE_DIR"] = cache_dir
    origins, same_masks, files = [], [], []
    for _ in range(2):
        report, _ = _compile(model, inputs, CASES["density 0.5"], cache=True)
        dist.barrier()  # the second compile starts when the first has written on every rank
        origins.append(report.topology_origin)
        same_masks.append(all(torch.equal(a, b) for site in report.sparse_sites for a, b in zip(
            _masks(report, site.name), _masks(reference, site.name, site.model_heads))))
        files.append(sorted(p.name for p in pathlib.Path(cache_dir).rglob("*") if p.is_file()))
    return dict(origins=origins, same_masks=same_masks, files=files)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ulysses_runs():
    """Both ranks' outcomes per case (one pair of processes for all cases: each start costs ~10 s)."""
    context = torch.multiprocessing.get_context("spawn")
    results, port, cache_dir = context.Queue(), _free_port(), tempfile.mkdtemp(prefix="scalingattn-ulysses-cache-")
    processes = [context.Process(target=_worker, args=(rank, port, cache_dir, results)) for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = dict(results.get(timeout=400) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    for rank, outcome in outcomes.items():
        assert isinstance(outcome, dict), f"rank {rank} failed:\n{outcome}"
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_equals_single_process(ulysses_runs, case):
    permuted = CASES[case].get("balance_heads", False)
    held = {}
    for rank, outcomes in ulysses_runs.items():
        outcome = outcomes[case]
        assert outcome["close"], f"rank {rank}: max error {outcome['max_error']:.3g}"
        assert set(outcome["status"].values()) == {"sparse"}
        assert set(outcome["shapes"].values()) == {(1, 2, 432, 32)}  # H/2 heads, the whole sequence
        assert all(outcome["masks_are_slices"].values())
        held[rank] = outcome["heads"]
        assert outcome["ulysses"]["balanced"] is permuted
    for name in held[0]:
        assert sorted(held[0][name] + held[1][name]) == [0, 1, 2, 3]  # every head on exactly one rank
        if not permuted:
            assert (held[0][name], held[1][name]) == ((0, 1), (2, 3))


@pytest.mark.slow
def test_ulysses_balance_is_reported_alike_on_every_rank(ulysses_runs):
    reports = [ulysses_runs[rank]["FAST 0.25, permuted"]["ulysses"] for rank in (0, 1)]
    assert reports[0] == reports[1]
    before, after = reports[0]["rank_ms_before"], reports[0]["rank_ms_balanced"]
    assert len(before) == len(after) == 2
    assert RankTimes.spread(after) <= RankTimes.spread(before) + 1e-12
    assert sum(after) == pytest.approx(sum(before))


@pytest.mark.slow
def test_ulysses_cache_one_writer_then_every_rank_reads(ulysses_runs):
    cached = [ulysses_runs[rank]["cache"] for rank in (0, 1)]
    for outcome in cached:
        assert "calibrated" in outcome["origins"][0] and "Ulysses: 2 ranks" in outcome["origins"][0]
        assert "from cache" in outcome["origins"][1]
        assert outcome["same_masks"] == [True, True]  # float16 thresholds in the file: the same masks here
    assert cached[0]["files"][0] == cached[1]["files"][1]
    assert len([f for f in cached[0]["files"][0] if f.endswith(".safetensors")]) == 1  # one entry, one writer


# ---------------------------------------------------------------------------------------
# Balancing (a pure function: no processes)
# ---------------------------------------------------------------------------------------


def test_balance_evens_out_skewed_heads():
    times = [8.0, 7.0, 6.0, 5.0, 1.0, 1.0, 1.0, 1.0]  # model order: rank 0 holds all the slow heads
    order = balance(times, 2)
    assert sorted(order) == list(range(8))
    before, after = rank_times(times, range(8), 2), rank_times(times, order, 2)
    assert before == (26.0, 4.0)
    assert after == (15.0, 15.0)
    assert RankTimes.spread(after) == 0.0


def test_balance_gives_each_rank_its_share_of_heads():
    times = [float(h % 5) for h in range(40)]  # 40 heads (Wan2.1-14B) on 4 ranks
    order = balance(times, 4)
    assert sorted(order) == list(range(40))
    after = rank_times(times, order, 4)
    assert RankTimes.spread(after) < 0.03
    assert sum(after) == pytest.approx(sum(times))


def test_balance_counts_earlier_sites():
    """A rank already slower from earlier sites gets the faster heads of this one."""
    order = balance([4.0, 3.0, 2.0, 1.0], 2, loads=[10.0, 0.0])
    assert rank_times([4.0, 3.0, 2.0, 1.0], order, 2) == (3.0, 7.0)


def test_balance_is_deterministic_on_ties():
    assert balance([1.0] * 4, 2) == balance([1.0] * 4, 2) == (0, 2, 1, 3)


# ---------------------------------------------------------------------------------------
# Names and options (no processes)
# ---------------------------------------------------------------------------------------


def test_hook_wrapped_module_paths_read_as_plain_ones():
    """diffusers' hooks wrap forwards; dynamo names the modules through the wrappers."""
    from types import SimpleNamespace

    from scaling_compiler.passes.detect import _module_path

    wrapped = ("L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].0.forward.func"
               ".__closure__[0].cell_contents.forward.__self__.attn1")
    node = SimpleNamespace(meta={"nn_module_stack": {"k": (wrapped, None)}})
    assert _module_path(node) == "blocks.0.attn1"


def test_balance_heads_must_be_a_bool():
    with pytest.raises(ValueError, match="option 'balance_heads' must be True or False"):
        ScalingAttnBackend(balance_heads="yes")


def test_ring_attention_keys_are_recognised():
    """Ring attention's k: a slice of a chunk of the all-gathered key/value buffer (diffusers'
    TemplatedRingAttention); such a site stays dense. A plain k is not ring attention."""
    import operator

    from scaling_compiler.passes.ulysses import is_ring

    functional = torch.ops._c10d_functional
    graph = torch.fx.Graph()
    kv = graph.placeholder("kv")
    gathered = graph.call_function(functional.all_gather_into_tensor.default, (kv, 2, "0"))
    chunks = graph.call_method("chunk", (graph.call_function(functional.wait_tensor.default, (gathered,)), 2))
    key = graph.call_method("reshape_as", (graph.call_function(operator.getitem, (chunks, 1)), kv))
    assert is_ring(graph.call_method("permute", (key, 0, 2, 1, 3)))
    assert not is_ring(graph.call_method("permute", (kv, 0, 2, 1, 3)))
