"""Calibration (WEST): threshold maps from running the captured graph on calibration inputs.

The graph dynamo hands the backend takes the model's weights as inputs, so it can be run
as it is with `torch.fx.Interpreter`. At each attention site the interpreter computes the
exact block significance from q and k (`kernels/block_mass.py`) before running the dense
attention, so later layers see the model's real activations. It also keeps the exact
key-block mass of `SAMPLED_ROWS` query rows per batch entry (one in each of that many query
blocks spread evenly, at a random offset): FAST's per-row fidelity curves are made from them.

Calibration inputs are prompt-agnostic by default, made from the example inputs (the
topology is encoded by the weights, not the prompt). Which inputs are which comes from dynamo's
own records (passes/inputs.py), the same on static graphs and on each shape of a symbolic one:
the model's parameters, buffers and other state are kept; so are integer, boolean and index
tensors (position ids, masks: random values would index out of range) and Python numbers. Only
the caller's floating activations are randomised: tensors of two or more dims (latents, text
embeddings, pooled projections) become Gaussian noise with the example's standard deviation; the
timestep input found by detection becomes uniform random values in [0, its first step's
timestep), in its own dtype; other per-sample floats (guidance) become uniform in [0, 1000) if
the example is above 1, else in [0, 1). Users can instead pass their own inputs by argument name.

Calibration that fails, for any reason, raises `CalibrationError`; the policy then keeps the
graph's sites dense and says why (policy.py), so a model calibration cannot run still compiles.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Mapping, Sequence

import torch
import torch.fx

from ... import cache
from ...kernels.bitmask import BLOCK_SIZE, num_blocks
from ...kernels.block_mass import block_mass, row_block_mass
from ...passes.inputs import GraphInput, graph_inputs
from ...passes.ulysses import UlyssesSlice, agree
from ...sites import GraphRecord, Site, TimestepInput
from .parallel import gather_topology
from .topology import SiteTopology, Topology, site_problem, thresholds_from_significance

log = logging.getLogger(__name__)

SAMPLED_ROWS = 16  # per batch entry and calibration sample, as in the FAST paper


class CalibrationError(RuntimeError):
    """Calibration of a graph failed; the message says why (the original exception is its cause)."""


def calibration_inputs(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    sample: int,
    seed: int,
    user_inputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
    timestep: TimestepInput | None = None,
) -> list[Any]:
    """Inputs of calibration sample `sample`: the user's (by argument name) or prompt-agnostic ones.

    `timestep`: the graph's timestep input (detection), randomised over its range.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + sample)
    overrides = user_inputs[sample % len(user_inputs)] if user_inputs else {}
    inputs = []
    for position, (graph_input, example) in enumerate(zip(graph_inputs(gm), example_inputs)):
        if graph_input.is_activation and graph_input.name in overrides:
            inputs.append(overrides[graph_input.name].to(example.device, example.dtype))
        elif user_inputs or not isinstance(example, torch.Tensor):
            inputs.append(example)
        elif timestep is not None and position == timestep.position:
            inputs.append(_random_timestep(example, timestep.timestep_max, generator))
        else:
            inputs.append(_randomised(graph_input, example, generator))
    return inputs


def _randomised(graph_input: GraphInput, example: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise in place of a floating activation; anything else as it is."""
    if not graph_input.is_activation or not example.is_floating_point() or example.numel() == 0:
        return example
    if example.dim() >= 2:
        std = example.float().std().clamp_min(1e-3) if example.numel() > 1 else 1.0
        noise = torch.randn(example.shape, generator=generator) * float(std)
        return noise.to(example.device, example.dtype)
    high = 1000.0 if float(example.float().abs().max()) > 1 else 1.0
    values = torch.rand(example.shape, generator=generator) * high
    return values.to(example.device, example.dtype)


def _random_timestep(example: torch.Tensor, timestep_max: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps in [0, timestep_max), in the example's dtype (integer timesteps stay integers)."""
    values = torch.rand(example.shape, generator=generator) * timestep_max
    if not example.is_floating_point():
        values = values.floor()
    return values.to(example.device, example.dtype)


class _SiteCapture(torch.fx.Interpreter):
    """Runs the graph; at each site, accumulates per-sample threshold maps and block mass."""

    def __init__(self, gm: torch.fx.GraphModule, sites: list[Site], seed: int) -> None:
        super().__init__(gm)
        self.sites = {site.node: site for site in sites}
        # q, k and masks are kept from when they are computed until their site runs: the
        # interpreter frees values after their last use, which for a hand-written softmax
        # chain comes before the site's final matmul
        self.sites_needing = Counter(n for site in sites for n in {site.q_node, site.k_node, site.mask_node} if n)
        self.pinned: dict[torch.fx.Node, torch.Tensor] = {}
        self.thresholds: dict[str, torch.Tensor] = {}  # running minimum over samples
        self.mass_sum: dict[str, torch.Tensor] = {}
        self.row_mass: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}  # (H, R, Nk) each
        self.row_blocks: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
        self.generator = torch.Generator().manual_seed(seed)

    def run_node(self, node: torch.fx.Node) -> Any:
        site = self.sites.get(node)
        if site is not None:
            q, k = self.pinned[site.q_node], self.pinned[site.k_node]
            key_padding = self.pinned[site.mask_node].reshape(-1, site.kv_len) if site.key_padding else None
            significance = block_mass(q, k, site.scale, key_padding)  # (B, H, Nq, Nk)
            per_sample = thresholds_from_significance(significance).amin(dim=0)
            previous = self.thresholds.get(site.name)
            self.thresholds[site.name] = per_sample if previous is None else torch.minimum(previous, per_sample)
            self.mass_sum[site.name] = self.mass_sum.get(site.name, 0) + significance.sum(dim=0)
            rows = sample_rows(site.q_len, self.generator)
            per_row = row_block_mass(q, k, site.scale, rows, key_padding)  # (B, H, R, Nk)
            self.row_mass[site.name].append(per_row.transpose(0, 1).flatten(1, 2).cpu())
            self.row_blocks[site.name].append((rows // BLOCK_SIZE).repeat(per_row.shape[0]))
            self._unpin(site)
        value = super().run_node(node)
        if node in self.sites_needing:
            self.pinned[node] = value
        return value

    def _unpin(self, site: Site) -> None:
        for needed in {site.q_node, site.k_node, site.mask_node} - {None}:
            self.remaining[needed] -= 1
            if self.remaining[needed] == 0:
                del self.pinned[needed]

    def run(self, *args: Any) -> Any:
        self.remaining = Counter(self.sites_needing)
        return super().run(*args)


def calibrate(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    sites: list[Site],
    samples: int,
    seed: int,
    user_inputs: Sequence[Mapping[str, torch.Tensor]] | None = None,
    timestep: TimestepInput | None = None,
) -> dict[str, SiteTopology]:
    """WEST threshold maps of `sites`, each T = min over samples (and batch entries) of T_i.

    Raises `CalibrationError` whatever goes wrong (bad user inputs, a model that fails on the
    calibration inputs, out of memory), with the original exception as its cause.
    """
    try:
        return _calibrate(gm, example_inputs, sites, samples, seed, user_inputs, timestep)
    except Exception as error:  # noqa: BLE001  (any failure: the policy falls back to dense sites)
        raise CalibrationError(f"{type(error).__name__}: {error}".split("\n", 1)[0]) from error


def _calibrate(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    sites: list[Site],
    samples: int,
    seed: int,
    user_inputs: Sequence[Mapping[str, torch.Tensor]] | None,
    timestep: TimestepInput | None,
) -> dict[str, SiteTopology]:
    capture = _SiteCapture(gm, sites, seed)
    start = time.perf_counter()
    batch_total = 0
    with torch.no_grad():
        for sample in range(samples):
            inputs = calibration_inputs(gm, example_inputs, sample, seed, user_inputs, timestep)
            capture.run(*inputs)
            batch_total += sites[0].batch
            if sites[0].device.type == "cuda":
                torch.cuda.synchronize(sites[0].device)  # honest progress times
            log.info("scalingattn: WEST calibration sample %d/%d (%.1f s)", sample + 1, samples,
                     time.perf_counter() - start)
    return {
        site.name: SiteTopology(
            # on the host: only the tuning pass and the report read them, and on a GPU they would
            # hold (H, Nq, Nk) floats per site for as long as the compiled model lives
            thresholds=capture.thresholds[site.name].cpu(), mass=(capture.mass_sum[site.name] / batch_total).cpu(),
            q_len=site.q_len, kv_len=site.kv_len, token_grid=site.token_grid, text_spans=site.text_spans,
            source="calibrated", row_mass=torch.cat(capture.row_mass[site.name], dim=1),
            row_blocks=torch.cat(capture.row_blocks[site.name]),
        )
        for site in sites
    }


def sample_rows(q_len: int, generator: torch.Generator, count: int = SAMPLED_ROWS) -> torch.Tensor:
    """int64 (min(count, Nq),): one query row in each of `count` query blocks spread evenly."""
    blocks = torch.linspace(0, num_blocks(q_len) - 1, min(count, num_blocks(q_len))).round().long().unique()
    sizes = (q_len - blocks * BLOCK_SIZE).clamp(max=BLOCK_SIZE)
    return blocks * BLOCK_SIZE + (torch.rand(len(blocks), generator=generator) * sizes).long()


def west_topology(graph: GraphRecord, sites: list[Site], options: Any) -> tuple[Topology, str, float]:
    """Threshold maps for `sites`: from the topology file, else the cache, else calibration.

    `options` are the west_fast policy's. Returns the topology, a sentence saying where it came
    from (for the report) and the seconds spent calibrating.
    """
    gm, example_inputs, config = graph.gm, graph.example_inputs, graph.config
    fingerprint = _fingerprint(gm, example_inputs)
    settings = {
        "samples": options.calibration_samples, "seed": options.calibration_seed,
        "inputs": "user" if options.calibration_inputs else "prompt-agnostic", "sampled_rows": SAMPLED_ROWS,
    }
    maps: dict[str, SiteTopology] = {}
    origin, seconds = [], 0.0
    if options.topology_file:
        maps.update(_from_file(options.topology_file, sites))
        origin.append(f"{len(maps)} sites from {options.topology_file}")
    missing = [site for site in sites if site.name not in maps]
    ulysses = next((site.ulysses for site in missing if site.ulysses is not None), None)
    if missing:
        payload = {"fingerprint": fingerprint, "sites": [_signature(s) for s in missing], "calibration": settings}
        key, fields = cache.cache_key(payload, sites[0].device), cache.key_fields(payload, sites[0].device)
        path = cache.entry_path(key)
        # else: warned, compile uncached
        use_cache = config.cache and fingerprint != UNKNOWN_WEIGHTS and cache.writable_dir() is not None
        cached = _load_cached(path, fields, fingerprint, settings, missing) if use_cache else None
        if ulysses is not None and not agree(cached is not None, ulysses, sites[0].device):
            cached = None  # every rank calibrates, or none: calibration runs the graph's all-to-alls
        if cached is not None:
            maps.update(cached.sites)
            origin.append(f"{len(missing)} sites from cache {cache.cache_dir() / key}")
        else:
            start = time.perf_counter()
            calibrated = _calibrate_all_ranks(graph, missing, options, ulysses)
            maps.update(calibrated)
            seconds = time.perf_counter() - start
            origin.append(f"{len(missing)} sites calibrated on {options.calibration_samples} "
                          f"{settings['inputs']} samples in {seconds:.1f} s"
                          + (f" (Ulysses: {ulysses.world} ranks, heads gathered)" if ulysses else ""))
            if use_cache and (ulysses is None or ulysses.rank == 0):  # one writer per entry
                cache.store(path, Topology(fingerprint, calibrated, settings, key=fields).save)
    return Topology(fingerprint, maps, settings), "; ".join(origin), seconds


def _calibrate_all_ranks(graph: GraphRecord, sites: list[Site], options: Any, ulysses: UlyssesSlice | None
                         ) -> dict[str, SiteTopology]:
    """`calibrate`; under Ulysses on every rank at once, each rank's heads then gathered, so that every
    rank holds the maps of all heads (those a single process calibrates). A rank whose calibration
    fails makes every rank fail, after the others finished theirs (no rank is left in a collective)."""
    error = None
    try:
        maps = calibrate(graph.gm, graph.example_inputs, sites, options.calibration_samples,
                         options.calibration_seed, options.calibration_inputs, graph.timestep)
    except CalibrationError as failure:
        if ulysses is None:
            raise
        error, maps = failure, {}
    if ulysses is None:
        return maps
    if not agree(error is None, ulysses, sites[0].device):
        raise error or CalibrationError("calibration failed on another Ulysses rank")
    return gather_topology(Topology("", maps, {}), sites).sites


UNKNOWN_WEIGHTS = "unknown"  # the fingerprint of weights that cannot be fingerprinted: never cached


def _fingerprint(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """The weights' fingerprint, or UNKNOWN_WEIGHTS (with a warning) when a weight's values cannot be read."""
    weights = [x for graph_input, x in zip(graph_inputs(gm), example_inputs) if graph_input.is_weight]
    try:
        return cache.weights_fingerprint(weights)
    except cache.UnfingerprintableWeight as error:
        log.warning("scalingattn: %s; calibrating without the cache", error)
        return UNKNOWN_WEIGHTS


def _load_cached(path, fields: dict[str, Any], fingerprint: str, settings: dict[str, Any],
                 sites: list[Site]) -> Topology | None:
    """The cached topology at `path` if it is whole and describes exactly `sites` under these key fields.

    Checked beyond the key: a file copied under another key (another grid, other calibration
    settings, another model) carries its own key fields; one that claims these fields is still
    checked site by site, and Topology.load has checked the checksum of its data.
    """
    def problem(topology: Topology) -> str | None:
        if topology.checksum is None or topology.key is None:
            return "no checksum or key fields (written by an older version)"
        mismatch = cache.field_mismatch(topology.key, fields)
        if mismatch:
            return mismatch
        if topology.fingerprint != fingerprint:
            return f"weights fingerprint {topology.fingerprint} != {fingerprint}"
        if topology.calibration != settings:
            return f"calibration settings {topology.calibration} != {settings}"
        if sorted(topology.sites) != sorted(s.name for s in sites):
            return f"sites {sorted(topology.sites)} != {sorted(s.name for s in sites)}"
        for site in sites:
            site_map = topology.sites[site.name]
            heads = site.ulysses.total_heads if site.ulysses is not None else site.heads
            reason = site_problem(site_map, heads, site.q_len, site.kv_len, site.token_grid, site.text_spans)
            if reason is None and (site_map.source != "calibrated" or site_map.row_mass is None):
                reason = f"source {site_map.source!r}, sampled rows {'missing' if site_map.row_mass is None else 'kept'}"
            if reason:
                return f"site {site.name}: {reason}"
        return None

    return cache.load(path, Topology.load, problem)


def _from_file(path: str, sites: list[Site]) -> dict[str, SiteTopology]:
    """Maps of `sites` found in the file, resized to the site's grid when the shapes differ."""
    stored = Topology.load(path).sites
    maps = {}
    for site in sites:
        source = stored.get(site.name)
        if source is None:
            log.warning("scalingattn: %s has no map for site %s; calibrating it", path, site.name)
        elif (source.q_len, source.kv_len) == (site.q_len, site.kv_len):
            maps[site.name] = source
        elif source.token_grid and site.token_grid and site.q_len == site.kv_len:
            try:
                maps[site.name] = source.transfer(site.q_len, site.token_grid, site.text_spans)
            except ValueError as error:  # e.g. the text spans differ: this site cannot use the file
                log.warning("scalingattn: option 'topology_file' %s: cannot resize the map of site %s (%s); "
                            "calibrating it", path, site.name, error)
        else:
            log.warning("scalingattn: %s maps site %s at %d tokens, not %d, and a grid is unknown; calibrating it",
                        path, site.name, source.q_len, site.q_len)
    return maps


def _signature(site: Site) -> dict[str, Any]:
    heads = site.ulysses.total_heads if site.ulysses is not None else site.heads  # the model's, on any rank
    return {
        "name": site.name, "shape": [site.batch, heads, site.q_len, site.kv_len, site.head_dim],
        "dtype": str(site.dtype), "grid": site.token_grid, "text_spans": site.text_spans,
        "token_order": site.token_order,
    }
