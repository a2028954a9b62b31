"""`python -m benchmarks.end_to_end`: progress logging on, inductor's performance hints on, then `cli.main`."""
import logging
import os

import torch

from benchmarks.end_to_end.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scaling_compiler").setLevel(logging.INFO)  # calibration progress
    if "TORCH_LOGS" not in os.environ:
        torch._logging.set_logs(perf_hints=True)  # why inductor skips CUDA graphs, when it does
    main()
