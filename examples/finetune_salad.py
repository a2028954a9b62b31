"""Tune SALAD's linear branches of the tiny video DiT by distillation from the dense model, in a time budget.

    python examples/finetune_salad.py --density 0.1 --out runs/salad-0.1     # GPU: 10 minutes, bf16, inductor
    python examples/finetune_salad.py --quick --out /tmp/salad               # CPU, CI size: seconds

Student: the trained tiny DiT (`demo/video_dit.py`) compiled with
`ScalingAttnBackend(density=D, linear_branch=True, timesteps=<the sampler's>)`: WEST masks, FAST
densities per (layer, step, head), as the quality harness's "west:fast" variant, plus one gated
linear-attention branch per sparse site (`scaling_compiler/salad/`). The model is frozen; only
the branches' parameters (feature maps, projection and gate) are tuned. Teacher: the same model, dense, eager.

Each call draws its videos, procedural ones (`synthetic_videos`) from a training seed range
(TRAIN_SEED_BASE upward; the harness's noise seeds are small integers) whose label triples are
never one of the harness's prompts (`synthetic_videos.EVAL_PROMPTS`), picks one of the sampler's
steps at random and noises them to that step's sigma, as the trainer's flow-matching
objective does (x = (1 - s) x0 + s noise). Like the sampler, the model runs each video twice,
with its condition and with the null condition (CFG), all rows at the same step (the step's masks
follow the timestep input: one compiled graph serves every step). The loss is the distillation
MSE between student and teacher velocities: over the raw rows plus over the guided velocity
u + g (c - u) that the sampler integrates.

A step's --batch videos run as calls of --micro-batch videos (2 rows each with CFG), their
gradients accumulated. The default, 1 video per call, is the quality harness's own batch, and the
student is then compiled on the harness's own compiling call (its first held-out prompt and noise
seed 0; no loss, no gradient): WEST calibrates from the compiling call's inputs, so the branches are
tuned against the very masks the harness calibrates for its training-free variants, with or without
a shared cache (on the H200, masks calibrated from a tuning batch scored 3 dB lower at density 0.1,
and a shared cache handed them to the harness). Videos stay float32, as the sampler feeds them.
Larger calls may run faster on a GPU (not measured) but compile on a tuning batch: other masks.
On an H200 a call (forward + backward, host-bound) takes ~35 ms and a step of 8 videos ~0.46 s: a
9.3-minute budget ran 1,060 steps (8,480 videos). Run tunings one after another: three sharing one
GPU ran ~25x slower per step.
AdamW (no weight decay), gradients clipped at norm 1, the learning rate warmed up over --warmup
steps then on a cosine down to a tenth of --lr at the end of the budget (or of --steps). The
default peak 5e-3 was chosen on the CPU at 5x32x32 (160 videos, density 0.1, the harness's 8
prompts): +4.8 dB PSNR over west:fast against +4.2 dB at 5e-4 and +3.7 dB at 2e-2.

Writes to --out: `branches.safetensors` (the final branches, with the tuning's settings in its
header: the harness checks the density), `branches_step<N>.safetensors` every --ckpt-every
steps, `loss.jsonl` (one record per step) and `summary.json`. Progress goes to stderr every few
seconds. The budget (--minutes) counts everything, compile included; a run stops at --steps or
when the budget is spent, whichever comes first.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel
from scaling_compiler.demo import synthetic_videos as sv
from scaling_compiler.demo.sampling import (DEFAULT_GUIDANCE, DEFAULT_SHIFT, compile_call_inputs, sampler_timesteps,
                                            sigma_schedule)
from scaling_compiler.demo.video_dit import TinyVideoDiT, load_pretrained

log = logging.getLogger("finetune_salad")

TRAIN_SEED_BASE = 1_000_000  # data and noise seeds of tuning: far from the harness's (0, 1, 2, ...)
PROGRESS_EVERY_S = 5.0
RESERVE_S = 10.0  # of the budget, kept for the final save
# --quick: the CI size on the CPU (the quality harness's --quick video: 3x32x32 = 768 tokens, 6 blocks)
# and a pool of 2 batches cycled, so that the loss is compared on the same data early and late
QUICK = {"device": "cpu", "steps": 8, "batch": 1, "video": (3, 32, 32), "sampler_steps": 2,
         "calibration_samples": 1, "compiler": "eager", "ckpt_every": 4, "lr": 1e-3, "warmup": 0, "data_pool": 2}


@dataclass(frozen=True)
class Batch:
    """One tuning step's inputs: 2B rows (conditional first, unconditional after) at one sampler step."""

    video: torch.Tensor  # (2B, C, F, H, W) noised to the step's sigma
    timestep: torch.Tensor  # (2B,) all the same: 1000 x sigma
    tokens: torch.Tensor  # (2B, 3) condition ids, then null ids
    sigma: float  # the step's noise level (timestep / 1000), known on the host


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, default=0.1, help="the sparse attention's mean density (FAST)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the budget)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget, compile and saves included")
    p.add_argument("--batch", type=int, default=None, help="videos per optimizer step (default 8)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="videos per compiled call (each runs twice: CFG); 1 compiles the harness's batch of 2 rows, "
                        "so that WEST calibrates (and caches) the same masks the quality harness runs")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default 5e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps (default 20)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale of the guided-velocity loss")
    p.add_argument("--sampler-steps", type=int, default=None,
                   help="the sampler's steps: FAST's schedule and the tuning timesteps (default 30, as the harness)")
    p.add_argument("--video", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="video frames, height, width (default: the model's 9 64 64)")
    p.add_argument("--calibration-samples", type=int, default=None, help="WEST calibration runs (backend default)")
    p.add_argument("--compiler", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="inner compiler (default: inductor on CUDA, aot_eager on the CPU, eager with --quick)")
    p.add_argument("--device", default=None, help="default: cuda if available (--quick: cpu)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/salad-<density>)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps (default 100)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these branches (an earlier run's branches.safetensors at the same density) "
                        "instead of fresh ones; the optimizer and the learning-rate schedule start anew (pass "
                        "another --seed than the earlier run's for videos it has not seen)")
    p.add_argument("--seed", type=int, default=0, help="offsets the training seeds (TRAIN_SEED_BASE + ...)")
    p.add_argument("--data-pool", type=int, default=None,
                   help="cycle this many fixed batches instead of fresh ones every step (default 0: fresh; --quick 2)")
    p.add_argument("--quick", action="store_true", help="CI size on the CPU: 768 tokens, 2 sampler steps, "
                   f"{QUICK['steps']} steps, fp32")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {
        "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": None, "batch": 8, "video": None,
        "sampler_steps": 30, "calibration_samples": None, "compiler": None, "ckpt_every": 100, "lr": 5e-3,
        "warmup": 20, "data_pool": 0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.compiler = args.compiler or ("inductor" if str(args.device).startswith("cuda") else "aot_eager")
    args.out = args.out or Path(f"runs/salad-{args.density:g}")
    if args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    if not 0 < args.density < 1:
        p.error("--density must be in (0, 1): at 1 there is no sparse site to add a branch to")
    return args


def student_backend(args: argparse.Namespace, weights: str | Path | None = None) -> ScalingAttnBackend:
    """The backend of the quality harness's "west:fast" variant at --density, plus the linear branches
    (loaded from `weights` if given). Every site sparse whatever the device's costs, as in the harness."""
    options: dict[str, Any] = {"density": args.density, "timesteps": sampler_timesteps(args.sampler_steps),
                               "compiler": args.compiler, "linear_branch": True}
    if args.calibration_samples is not None:
        options["calibration_samples"] = args.calibration_samples
    if weights is not None:
        options["linear_branch_weights"] = weights
    return ScalingAttnBackend(**options, cost_model=CostModel.ideal("finetune_salad"))


def training_labels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3) random labels, redrawn wherever a row is one of the harness's held-out prompts."""
    held_out = torch.stack([sv.parse_prompt(p) for p in sv.EVAL_PROMPTS])  # (P, 3)
    labels = sv.sample_labels(batch, generator)
    while True:
        hit = (labels[:, None, :] == held_out[None]).all(-1).any(-1)  # (B,)
        if not hit.any():
            return labels
        labels[hit] = sv.sample_labels(int(hit.sum()), generator)


def make_batch(args: argparse.Namespace, index: int, video: tuple[int, int, int]) -> Batch:
    """Micro-batch `index`'s videos, noise and sampler step, all from seed TRAIN_SEED_BASE + seed + index.
    The video stays float32, as the sampler's state (the model casts it): one graph for tuning and harness."""
    generator = torch.Generator().manual_seed(TRAIN_SEED_BASE + args.seed * 100_003 + index)
    videos = args.micro_batch
    labels = training_labels(videos, generator)
    x0 = sv.render_videos(labels, generator, *video)  # (B, 3, F, H, W) on the CPU: seeded, device-independent
    noise = torch.randn(x0.shape, generator=generator)
    step = int(torch.randint(args.sampler_steps, (1,), generator=generator))
    sigma = float(sigma_schedule(args.sampler_steps, DEFAULT_SHIFT)[step])
    x = (1 - sigma) * x0 + sigma * noise
    tokens = sv.labels_to_tokens(labels)
    return Batch(torch.cat([x, x]).to(args.device), torch.full((2 * videos,), 1000.0 * sigma, device=args.device),
                 torch.cat([tokens, sv.null_tokens(videos)]).to(args.device), sigma)


def harness_compile_call(channels: int, video: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The inputs of the quality harness's compiling call with its default first job (held-out prompt
    EVAL_PROMPTS[0], noise seed 0; `sampling.compile_call_inputs`). WEST calibrates from the compiling
    call's inputs, so compiling on these gives the masks the harness calibrates for itself (on the H200,
    west:fast at 0.1 scored 15.37 dB on the harness's own masks, 12.17 dB on masks calibrated from a
    tuning batch). The call only compiles: no loss, no gradient; no tuning batch is ever a held-out prompt."""
    tokens = sv.labels_to_tokens(sv.parse_prompt(sv.EVAL_PROMPTS[0])[None]).to(device)
    return compile_call_inputs(tokens, sv.null_tokens(1, device), (channels, *video), seed=0)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, guidance: float) -> torch.Tensor:
    """MSE of the raw velocities (cond and uncond rows) plus MSE of the guided velocity u + g (c - u)."""
    student, teacher = student.float(), teacher.float()
    guided = [v_u + guidance * (v_c - v_u) for v_c, v_u in (v.chunk(2) for v in (student, teacher))]
    return F.mse_loss(student, teacher) + F.mse_loss(*guided)


def tuning_metadata(args: argparse.Namespace, video: tuple[int, int, int], step: int, minutes: float) -> dict[str, str]:
    """The branch file's header: the density (the harness refuses another) and how it was tuned."""
    tuning = {"density": args.density, "masks": "west", "schedule": "fast", "sampler_steps": args.sampler_steps,
              "video": list(video), "steps": step, "batch": args.batch,
              "micro_batch": args.micro_batch, "lr": args.lr, "warmup": args.warmup, "videos_seen": step * args.batch, "minutes": round(minutes, 2),
              "train_seed_base": TRAIN_SEED_BASE, "held_out_prompts": list(sv.EVAL_PROMPTS),
              "calibration_samples": args.calibration_samples, "objective": "distillation (dense teacher), CFG pairs",
              "init": None if args.init is None else str(args.init)}
    return {"density": repr(args.density), "tuning": json.dumps(tuning)}


class Progress:
    """A progress line on the log at most every PROGRESS_EVERY_S seconds (and on the last step)."""

    def __init__(self, total: int | None, budget_s: float, start: float) -> None:
        self.total, self.budget_s, self.start, self.last = total, budget_s, start, 0.0

    def update(self, step: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = now - self.start
        of = f"/{self.total}" if self.total else ""
        log.info("step %d%s  loss %.5f  %.1f s elapsed, %.1f s of budget left", step, of, loss, elapsed,
                 max(0.0, self.budget_s - elapsed))


def learning_rate(args: argparse.Namespace, step: int, budget_used: float) -> float:
    """Linear warm-up over --warmup steps, then a cosine from --lr down to a tenth of it at the end of the
    run: the budget's end, or --steps if that comes first."""
    done = max(budget_used, step / args.steps if args.steps else 0.0)
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, done)))


def make_optimizer(backend: ScalingAttnBackend, lr: float, compile_s: float) -> torch.optim.Optimizer:
    """AdamW over the branches the first compiled call created."""
    params = list(backend.linear_branches.parameters())
    if not params:
        raise RuntimeError(f"no linear branch was added (no sparse site?):\n{backend.summary()}")
    log.info("compiled in %.1f s: %d branches, %.2f M parameters to tune", compile_s,
             len(backend.linear_branches.sites), sum(p.numel() for p in params) / 1e6)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def tune(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    budget_s = 60.0 * args.minutes
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model: TinyVideoDiT = load_pretrained(device, dtype).requires_grad_(False)
    video = tuple(args.video or (model.config.frames, model.config.height, model.config.width))
    backend = student_backend(args, weights=args.init)
    student = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("tuning SALAD branches of the tiny DiT at density %g on %s (%s): video %s = %d tokens, %d videos "
             "per step in calls of %d (x2 CFG), %d sampler steps, budget %.1f min; writing to %s", args.density,
             device, dtype, "x".join(map(str, video)), model.config.num_tokens(*video), args.batch,
             args.micro_batch, args.sampler_steps, args.minutes, args.out)

    losses: list[float] = []
    optimizer = None  # the branches exist after the first compiled call
    graphs_after_first = compile_s = None
    if args.micro_batch == 1:  # the harness's batch: compile (and calibrate) on the harness's own first call
        with torch.enable_grad():  # a training graph, as every later call's; the output is not used
            student(*harness_compile_call(model.config.in_channels, video, device))
        compile_s, graphs_after_first = time.perf_counter() - start, len(backend.reports)
    progress = Progress(args.steps, budget_s, start)
    micro_steps = args.batch // args.micro_batch
    step = 0
    with (args.out / "loss.jsonl").open("w") as loss_log:
        while (args.steps is None or step < args.steps) and time.perf_counter() - start < budget_s - RESERVE_S:
            loss, timesteps = torch.zeros((), device=device), []
            for micro in range(micro_steps):  # gradients accumulate over the step's micro-batches
                index = step * micro_steps + micro
                batch = make_batch(args, index % (args.data_pool * micro_steps) if args.data_pool else index, video)
                with torch.no_grad():
                    teacher = model(batch.video, batch.timestep, batch.tokens)
                micro_loss = distillation_loss(student(batch.video, batch.timestep, batch.tokens), teacher,
                                               args.guidance) / micro_steps
                micro_loss.backward()
                loss += micro_loss.detach()  # no host sync per call: one per step, below
                timesteps.append(round(1000.0 * batch.sigma, 2))
                if compile_s is None:
                    compile_s = time.perf_counter() - start
                    graphs_after_first = len(backend.reports)  # the graph of every later call
            if optimizer is None:
                optimizer = make_optimizer(backend, args.lr, compile_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step, (time.perf_counter() - start) / budget_s)
            torch.nn.utils.clip_grad_norm_(backend.linear_branches.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss))
            loss_log.write(json.dumps({"step": step, "loss": round(losses[-1], 7), "timesteps": timesteps,
                                       "elapsed_s": round(time.perf_counter() - start, 2)}) + "\n")
            loss_log.flush()
            progress.update(step, losses[-1])
            if step % args.ckpt_every == 0:
                backend.linear_branches.save(args.out / f"branches_step{step}.safetensors",
                                             tuning_metadata(args, video, step, (time.perf_counter() - start) / 60))
    if not losses:
        raise RuntimeError(f"no tuning step ran within {args.minutes} min")
    progress.update(step, losses[-1], force=True)
    minutes = (time.perf_counter() - start) / 60
    path = backend.linear_branches.save(args.out / "branches.safetensors", tuning_metadata(args, video, step, minutes))
    window = max(1, min(10, len(losses) // 4))
    summary = {
        "density": args.density, "steps": step, "videos_seen": step * args.batch, "micro_batch_rows": 2 * args.micro_batch,
        "minutes": round(minutes, 2), "compile_s": round(compile_s, 1), "device": str(device),
        "first_loss": losses[0], "last_loss": losses[-1],
        "first_mean": sum(losses[:window]) / window, "last_mean": sum(losses[-window:]) / window,
        "recompiles": len(backend.reports) - graphs_after_first, "branches": str(path),
        "parameters": sum(p.numel() for p in backend.linear_branches.parameters()),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"summary": summary, "losses": losses, "backend": backend, "student": student, "model": model,
            "video": video, "path": path}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, tune, print the summary; returns it with the backend, compiled student and model."""
    args = parse_args(argv)
    result = tune(args)
    s = result["summary"]
    print(f"done: {s['steps']} steps, {s['videos_seen']} videos (calls of {s['micro_batch_rows']} rows: CFG), "
          f"{s['minutes']:.1f} min (compile {s['compile_s']:.0f} s); loss {s['first_loss']:.5f} -> {s['last_loss']:.5f} "
          f"(mean of the first/last {max(1, min(10, len(result['losses']) // 4))}: {s['first_mean']:.5f} -> "
          f"{s['last_mean']:.5f}); {s['recompiles']} recompiles; wrote {s['branches']}")
    result["args"] = args
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    main()
