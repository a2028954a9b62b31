"""Run M fuzzed attention configurations and print the counts the acceptance asks for.

    python -m tests.fuzz_count --examples 2000 --jobs 2 --seed 0

Each configuration (tests/fuzz_cases.py: `configs()`) is compiled at density 1.0 and 0.5; the
counts are crashes, wrong outputs, unsupported sites reported sparse, NaN/inf where eager has
none (and "sites": attention calls the report does not list). Jobs draw from hypothesis with
seeds `seed`, `seed + 1`, ...; every failure is printed with its configuration. Exit status 1
when anything failed.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import multiprocessing
import os
import sys
import time

KINDS = ("crash", "wrong", "unsupported_sparse", "nonfinite", "sites")


def run_chunk(seed: int, examples: int) -> tuple[int, int, collections.Counter, list[str], collections.Counter]:
    """(configurations run, distinct ones, failures by kind, failure lines, sites by status) of one
    hypothesis run."""
    import tests.conftest  # noqa: F401  (TRITON_INTERPRET without a GPU, a private cache folder)
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.fuzz_cases import configs, run_case

    torch.set_num_threads(1)  # one core per job
    seen: list = []
    counts: collections.Counter = collections.Counter()
    stats: collections.Counter = collections.Counter()
    lines: list[str] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(configs())
    def explore(config) -> None:
        seen.append(config)
        for failure in run_case(config, stats):
            counts[failure.kind] += 1
            lines.append(f"{failure.kind} at density {failure.density}: {failure.detail}\n    {config}")

    explore()
    return len(seen), len(set(seen)), counts, lines, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_count", description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="configurations in all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first job")
    args = parser.parse_args(argv)
    start = time.time()
    shares = [args.examples // args.jobs + (i < args.examples % args.jobs) for i in range(args.jobs)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        results = list(pool.map(run_chunk, [args.seed + i for i in range(args.jobs)], shares))
    total = sum(r[0] for r in results)
    distinct = sum(r[1] for r in results)
    counts = sum((r[2] for r in results), collections.Counter())
    for r in results:
        for line in r[3]:
            print(line)
    print(f"configurations: {total} ({distinct} distinct within each job), each compiled at density 1.0 and 0.5, "
          f"{time.time() - start:.0f} s")
    stats = sum((r[4] for r in results), collections.Counter())
    print("sites exercised: " + ", ".join(f"{key}: {n}" for key, n in sorted(stats.items())))
    print("  ".join(f"{kind}: {counts[kind]}" for kind in KINDS))
    return 1 if any(counts[kind] for kind in KINDS) else 0


if __name__ == "__main__":
    sys.exit(main())
