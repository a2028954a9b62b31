"""Quality variants shared by the benchmarks: a spec such as "west:fast", "west:uniform:0.2",
"window_3d", "dfsattn[:dense_fraction][/order]" or "salad" at a density -> ScalingAttnBackend options.

"salad" is "west:fast" plus SALAD's linear branches (`linear_branch=True`) loaded from a branch
file tuned at the same density (examples/finetune_salad.py).

`benchmarks.quality` runs them; `benchmarks.policies.fast_ablation` runs "west:fast" under
several fit settings.
"""
from __future__ import annotations

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo.sampling import DEFAULT_SHIFT, sampler_timesteps
from scaling_compiler.policies.dfsattn.schedule import DEFAULT_KEEP_RATIOS, DFSSchedule

SALAD = "salad"
DFS_DENSE_FRACTION = 12 / 50  # DFSAttn's dense steps (the paper's 12 of 50), at most half the density budget


def backend_options(variant: str, density: float, compiler: str, steps: int = 1, num_k_blocks: int | None = None,
                    linear_branch_weights: str | None = None) -> dict:
    """ScalingAttnBackend options of a variant spec "rule[:schedule[:warmup]][/order]",
    "dfsattn[:dense_fraction][/order]" or "salad" (with its `linear_branch_weights` file) at `density`.

    The schedule's steps are the sampler's own timesteps, so warm-up fractions and density
    targets count the steps that really run. `num_k_blocks` (key blocks per row) makes DFSAttn's
    fitted keep ratios count whole blocks, as its top-k does.
    """
    if variant == SALAD:
        if linear_branch_weights is None:
            raise ValueError("variant 'salad' needs a branch file tuned at its density (linear_branch_weights)")
        options = backend_options("west:fast", density, compiler, steps)
        return options | {"linear_branch": True, "linear_branch_weights": linear_branch_weights}
    spec, _, order = variant.partition("/")
    rule, schedule, warmup = (spec.split(":") + [None, None])[:3]
    options = {"compiler": compiler, "timesteps": sampler_timesteps(steps, DEFAULT_SHIFT)}
    if order:
        options["token_order"] = order
    if rule == "dfsattn":
        dense_fraction = min(DFS_DENSE_FRACTION, density / 2) if schedule is None else float(schedule)
        options |= {"policy": "dfsattn", "dense_layers": ()} | dfs_plan(density, steps, dense_fraction, num_k_blocks)
    else:
        options |= {"density": density, "masks": rule}
    if schedule and rule != "dfsattn":
        options["schedule"] = schedule
    if warmup:
        options["warmup"] = float(warmup)
    ScalingAttnBackend(**options)  # validates
    return options


def dfs_plan(density: float, steps: int, dense_fraction: float, num_k_blocks: int | None) -> dict:
    """DFSAttn's dense steps, refresh interval and keep ratios whose mean kept block fraction over
    all `steps` (dense steps count 1) is nearest `density`: the paper's ratios times one factor."""
    dense_steps = round(dense_fraction * steps)
    interval = max(1, (steps - dense_steps) // len(DEFAULT_KEEP_RATIOS))

    def plan(factor: float) -> tuple[dict, float]:
        options = {"dense_steps": dense_steps, "refresh_interval": interval,
                   "keep_ratios": tuple(round(min(1.0, factor * r), 4) for r in DEFAULT_KEEP_RATIOS)}
        schedule = DFSSchedule(num_steps=steps, dense_layers=(), **options)
        return options, schedule.density_report(1, steps, num_k_blocks).including_dense_steps

    plans = [plan(i / 1000 / min(DEFAULT_KEEP_RATIOS)) for i in range(1, 1001)]  # up to every ratio at 1
    if plans[0][1] > density + 1e-9:
        raise ValueError(f"dfsattn at density {density:g}: {dense_steps} dense steps of {steps} already keep "
                         f"{plans[0][1]:.3f} on average; give a smaller dense fraction (dfsattn:<fraction>)")
    return min(plans, key=lambda p: abs(p[1] - density))[0]


def variants(specs: list[str], densities: list[float]) -> list[tuple[str, float]]:
    """(variant, density) pairs, highest density first; density 1.0 only once (every block, any rule)."""
    result = []
    for density in sorted(set(densities), reverse=True):
        result += [("all_blocks", 1.0)] if density == 1.0 else [(spec, density) for spec in specs]
    return result
