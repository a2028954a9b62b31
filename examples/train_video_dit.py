"""Train the tiny video DiT with rectified flow on procedural videos, within a wall-clock budget.

    python examples/train_video_dit.py --device cuda --minutes 9

Videos come from `synthetic_videos` (a fresh seeded batch each step, no dataset). Training
starts at a low resolution (cheap steps learn shape, colour and motion) and spends the rest
of the budget at the full 9x64x64 video (9216 tokens), so the attention the backend sees is
trained at its default grid. bf16 autocast on the GPU, AdamW, EMA weights.

Every --ckpt-every steps (and at the end) the training state goes to --ckpt-dir/last.pt;
a later run with the same --ckpt-dir resumes from it. Losses go to --ckpt-dir/loss.jsonl.
At the end the EMA weights are exported as bf16 safetensors plus config JSON (--export).
With --report-dir, the exported model then samples a contact sheet of prompts and
measures per-head self-attention entropy against uniform.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from scaling_compiler.demo import synthetic_videos as sv
from scaling_compiler.demo.sampling import sample, save_contact_sheet, save_video_strip, shift_sigmas
from scaling_compiler.demo.video_dit import (
    DEFAULT_CHECKPOINT,
    TinyVideoDiTConfig,
    TinyVideoDiT,
    attention_entropy,
    build_model,
    example_inputs,
    load_checkpoint,
    save_checkpoint,
)

REPORT_PROMPTS = (
    "red circle bounce", "green square rotate", "blue triangle grow", "yellow cross orbit",
    "magenta ring shrink", "white hexagon bounce", "cyan triangle orbit", "orange square shrink",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this run, export included")
    p.add_argument("--steps", type=int, default=None, help="stop at this total step count")
    p.add_argument("--batch", type=int, default=24, help="batch at full resolution (halved on OOM)")
    p.add_argument("--lowres-batch", type=int, default=64)
    p.add_argument("--lowres-size", type=int, default=32, help="frame side of the low-resolution phase")
    p.add_argument("--lowres-fraction", type=float, default=0.4, help="share of a fresh run's budget at low res")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--p-uncond", type=float, default=0.1, help="condition dropout, for CFG")
    p.add_argument("--ckpt-dir", type=Path, default=Path("runs/tiny_video_dit"))
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --ckpt-dir")
    p.add_argument("--init", type=Path, default=None,
                   help="start a run that has no --ckpt-dir state from exported weights (e.g. the committed ones)")
    p.add_argument("--export", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the Wan blocks (GPU)")
    p.add_argument("--seed", type=int, default=0)
    # model size (defaults: TinyVideoDiTConfig); small values for CPU smoke runs
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="full-resolution frame side")
    return p.parse_args()


def make_config(args: argparse.Namespace) -> TinyVideoDiTConfig:
    overrides = {"num_layers": args.layers, "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
                 "ffn_dim": args.ffn, "frames": args.frames, "height": args.size, "width": args.size}
    return TinyVideoDiTConfig(**{k: v for k, v in overrides.items() if v is not None})


def flow_loss(model: TinyVideoDiT, x0: torch.Tensor, tokens: torch.Tensor, shift: float, device: str) -> torch.Tensor:
    """Rectified flow: x = (1 - s) x0 + s noise, regress the velocity noise - x0."""
    b = x0.shape[0]
    sigma = shift_sigmas(torch.sigmoid(torch.randn(b, device=device)), shift)  # logit-normal, shifted
    noise = torch.randn_like(x0)
    s = sigma.view(b, 1, 1, 1, 1)
    x = (1 - s) * x0 + s * noise
    with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
        pred = model(x, 1000.0 * sigma, tokens)
    return F.mse_loss(pred.float(), noise - x0)


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a run killed mid-save keeps the previous checkpoint


def train(args: argparse.Namespace) -> TinyVideoDiT:
    start = time.time()
    budget = args.minutes * 60
    device = args.device
    ckpt_path = args.ckpt_dir / "last.pt"
    state = torch.load(ckpt_path, map_location="cpu") if ckpt_path.exists() and not args.fresh else None
    init = load_checkpoint(args.init) if args.init and not state else None
    config = TinyVideoDiTConfig.from_dict(state["config"]) if state else init.config if init else make_config(args)
    model = build_model(config, seed=args.seed).to(device)
    if init:
        model.load_state_dict(init.state_dict())
        print(f"initialised from {args.init}")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, phase = 0, ("low" if args.lowres_fraction > 0 else "full")
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, phase = state["step"], state["phase"]
        print(f"resumed from {ckpt_path} at step {step} ({phase} resolution)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {config}\nparameters: {n_params / 1e6:.2f} M, device {device}")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.compile:
        model.transformer.compile_repeated_blocks(fullgraph=True)
    torch.manual_seed(args.seed * 1_000_003 + step)  # noise and timesteps; data has its own seeds

    batch = {"low": args.lowres_batch, "full": args.batch}
    size = {"low": args.lowres_size, "full": config.height}
    params, ema_params = list(model.parameters()), list(ema.parameters())
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    log = (args.ckpt_dir / "loss.jsonl").open("a")
    bar = tqdm(total=args.steps, initial=step, mininterval=10, desc="train")
    running, count, t_log, samples = 0.0, 0, time.time(), 0
    reserve = 20.0  # seconds kept for the final checkpoint and export

    def checkpoint() -> None:
        save_state(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "step": step, "phase": phase, "config": config.to_dict()})

    model.train()
    while time.time() - start < budget - reserve and (args.steps is None or step < args.steps):
        if phase == "low" and time.time() - start > args.lowres_fraction * budget:
            phase = "full"
            print(f"\nstep {step}: switching to full resolution {config.frames}x{config.height}x{config.width}")
        b, side = batch[phase], size[phase]
        width = side * config.width // config.height
        x0, labels = sv.make_batch(b, args.seed * 1_000_003 + step, config.frames, side, width, device)
        tokens = sv.labels_to_tokens(labels)
        tokens = torch.where(torch.rand(b, 1, device=device) < args.p_uncond, sv.NULL_TOKEN, tokens)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        try:
            loss = flow_loss(model, x0, tokens, config.flow_shift, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch[phase] = max(1, b // 2)
            print(f"\nout of memory at batch {b} ({phase}); retrying with {batch[phase]}")
            continue
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)

        running += loss.detach()
        count += 1
        samples += b
        bar.update(1)
        if step % 50 == 0:
            now = time.time()
            record = {"step": step, "loss": round(float(running) / count, 5), "phase": phase, "batch": b,
                      "lr": opt.param_groups[0]["lr"], "elapsed_s": round(now - start, 1),
                      "samples_per_s": round(samples / (now - t_log), 1)}
            if device.startswith("cuda"):
                record["max_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=record["loss"], phase=phase, sps=record["samples_per_s"])
            running, count, t_log, samples = 0.0, 0, now, 0
        if step % args.ckpt_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    log.close()
    save_checkpoint(ema, args.export)
    size_mb = args.export.stat().st_size / 2**20
    print(f"done: {step} steps in {time.time() - start:.0f} s; exported {args.export} ({size_mb:.1f} MiB)")
    return ema


@torch.no_grad()
def report(checkpoint: Path, out_dir: Path, device: str, seed: int = 0) -> None:
    """Contact sheet of REPORT_PROMPTS, a GIF of them, and per-head attention entropy."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_checkpoint(checkpoint, device, dtype)
    config = model.config
    labels = torch.stack([sv.parse_prompt(p) for p in REPORT_PROMPTS])
    tokens = sv.labels_to_tokens(labels).to(device)
    null = sv.null_tokens(len(REPORT_PROMPTS), device)
    t0 = time.time()
    videos = sample(model, tokens, null, config.video_shape, seed=seed, shift=config.flow_shift)
    seconds = time.time() - t0
    again = sample(model, tokens, null, config.video_shape, seed=seed, shift=config.flow_shift)
    deterministic = bool(torch.equal(videos, again))
    names = [sv.describe(l) for l in labels]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_contact_sheet(videos, names, out_dir / "tiny_dit_contact_sheet.png")
    save_video_strip(videos, out_dir / "tiny_dit_samples.gif")

    per_sigma = {}
    for sigma in (0.9, 0.5, 0.1):
        inputs = example_inputs(config, sigma=sigma, seed=seed, device=device, dtype=dtype)
        per_sigma[str(sigma)] = attention_entropy(model, inputs, rows=16, seed=seed)
    by_sigma = [v["layers"] for v in per_sigma.values()]
    summary = [[round(sum(ls[l][h]["ratio_to_uniform"] for ls in by_sigma) / len(by_sigma), 3)
                for h in range(config.num_attention_heads)] for l in range(config.num_layers)]
    result = {
        "checkpoint": checkpoint.name, "grid": [config.frames, config.height // 2, config.width // 2],
        "tokens": config.num_tokens(), "uniform_entropy": round(math.log(config.num_tokens()), 4),
        "ratio_to_uniform_mean_over_sigmas": summary, "sampling": {
            "prompts": names, "steps": 30, "seed": seed, "dtype": str(dtype), "seconds": round(seconds, 2),
            "deterministic_run_to_run": deterministic},
        "per_sigma": per_sigma,
    }
    (out_dir / "tiny_dit_attention_entropy.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"report: sampling {seconds:.1f} s, deterministic={deterministic}")
    for l, row in enumerate(summary):
        print(f"layer {l}: entropy / log(S) per head = {row}")


def main() -> None:
    args = parse_args()
    if args.minutes > 0:
        train(args)
    if args.report_dir is not None:
        report(args.export, args.report_dir, args.device, args.seed)


if __name__ == "__main__":
    main()
