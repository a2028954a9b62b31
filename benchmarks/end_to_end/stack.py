"""The stack layers (issue #18): when each can run here, torchao float8 linears, and FirstBlockCache's
sequence mode.

- `+fp8`: our backend with option `attention_dtype="fp8"` (sparse sites call
  `block_sparse_attention_fp8`; not on `dense`), and the device's cost model without its FP8 rows, so
  that every site the op can run does (by default the backend keeps a site 16-bit where those rows
  predict FP8 no faster: at density 0.1 on the H200). It needs bf16/fp16 inputs: `fp8_sites` of
  `sparse_sites` ran FP8, `fp8_refused` says why the others did not (--quick's fp32: all refused,
  which the output notes under the table).
- `+f8lin`: torchao float8 dynamic activation + weight linears, `quantize_(model.blocks,
  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))`
  (`benchmarks.common.quantize_linears`: inductor's settings stay the run's), on a copy of the model built
  from the same seed (quantize_ works in place; each variant's peak memory leaves out the weights of
  the model it does not run); `dense+f8lin` isolates the linears' gain.
  `float8_linears` counts the quantised (Float8Tensor) linear weights of every row (0 without +f8lin).
- `+fbc`: diffusers' FirstBlockCache (`model.enable_cache(FirstBlockCacheConfig(threshold=
  --fbc-threshold))`, default 0.2, the example of diffusers' docs: a step whose first-block residual
  moved less than that, relative to the previous step's, skips the other blocks). A cache skips
  nothing in a single step, so these variants run a mode of their own: sequences of `--cache-steps`
  (10; --quick 3) consecutive sampler steps from the middle of the 50, realistic timesteps, the
  latents moved by Euler updates with the model's output, the cache reset before each sequence;
  latency is the mean step time, `cache_skip_rate` the share of steps the cache skipped (read from
  the hook's state), `cache_computed` per step. Random weights: the skip rate is not a trained
  model's, and the quality cost is not measured here (that is the quality harness's). Not with +cg.
A layer that cannot run here skips the variant with the reason in the table and the JSON (never runs
it without that layer): +f8lin without torchao, on the CPU or below compute capability 8.9; +fp8
below 8.9 on a GPU; +cg on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Iterator

import torch

from benchmarks.common import FLOAT8_CAPABILITY, quantize_linears, quantized_linears
from benchmarks.end_to_end.model import Inputs, build_model
from benchmarks.end_to_end.timing import allocated_gib, timed_call
from benchmarks.end_to_end.variants import Section, Settings, Variant
from scaling_compiler.demo.sampling import diffusers_cache_context

FBC_LEADER_HOOK = "fbc_leader_block_hook"  # diffusers' name of FirstBlockCache's hook on the first block
FBC_THRESHOLD = 0.2  # FirstBlockCache's relative first-block residual change below which a step is skipped


def cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def sm() -> str:
    return "sm_" + "".join(map(str, cuda_capability()))


def skip_reason(variant: Variant, settings: Settings) -> str | None:
    """Why a layer of the variant cannot run here (it is then skipped, never run without that layer)."""
    if variant.cuda_graphs and not settings.cuda:
        return "CUDA graphs need a GPU"
    if variant.f8lin:
        reason = float8_linears_unavailable(settings)
        if reason:
            return reason
    if variant.fp8 and settings.cuda and cuda_capability() < FLOAT8_CAPABILITY:
        return f"FP8 attention needs compute capability >= 8.9, this GPU is {sm()}"
    if variant.fbc and not hasattr(importlib.import_module("diffusers.hooks"), "FirstBlockCacheConfig"):
        return "this diffusers has no FirstBlockCache"
    return None


def float8_linears_unavailable(settings: Settings) -> str | None:
    try:
        importlib.import_module("torchao.quantization")
    except ImportError:
        return "torchao float8 linears need torchao (pip install torchao)"
    if not settings.cuda:
        return ("torchao float8 linears need a GPU of compute capability >= 8.9 (torchao refuses the CPU, and "
                "inductor cannot compile them there)")
    if cuda_capability() < FLOAT8_CAPABILITY:
        return f"torchao float8 linears need compute capability >= 8.9, this GPU is {sm()}"
    return None


@dataclasses.dataclass
class Models:
    """A section's model, and its float8-linear copy (same seed, same weights) built on first use:
    `quantize_` changes a model in place, so the unquantised variants keep their own. Each model's
    resident GiB on the GPU is kept, so that a variant's peak memory can leave out the model it
    does not run (`idle_gib`)."""

    section: Section
    settings: Settings
    plain: torch.nn.Module
    plain_gib: float = 0.0
    float8: torch.nn.Module | None = None
    float8_gib: float = 0.0

    @classmethod
    def build(cls, section: Section, settings: Settings) -> "Models":
        before = allocated_gib(settings.cuda)
        plain = build_model(section, settings)
        return cls(section, settings, plain, allocated_gib(settings.cuda) - before)

    def for_variant(self, variant: Variant) -> torch.nn.Module:
        if not variant.f8lin:
            return self.plain
        if self.float8 is None:
            before = allocated_gib(self.settings.cuda)
            model = build_model(self.section, self.settings)
            quantize_linears(model.blocks, "float8")
            if quantized_linears(model) == 0:
                raise RuntimeError("quantize_ left every linear of the blocks unquantised")
            self.float8, self.float8_gib = model, allocated_gib(self.settings.cuda) - before
        return self.float8

    def idle_gib(self, variant: Variant) -> float:
        """GiB held by the model that `variant` does not run (0 while the float8 copy is not built)."""
        return self.plain_gib if variant.f8lin else self.float8_gib


@contextlib.contextmanager
def first_block_cache(model: torch.nn.Module, variant: Variant, threshold: float) -> Iterator[None]:
    """diffusers' FirstBlockCache on the model while the variant runs (+fbc); the model is shared, so off after."""
    if not variant.fbc:
        yield
        return
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield
    finally:
        model.disable_cache()


@dataclasses.dataclass
class CachedSequence:
    """Consecutive sampler steps under a step cache, from the inputs' latents with Euler updates (the
    cache compares each step's first-block residual with the previous step's, so the latents and
    timesteps must move as a sampler moves them). Each run starts from a reset cache."""

    model: torch.nn.Module  # the uncompiled transformer: its hooks keep the cache state
    compiled: Callable[..., Any]
    inputs: Inputs
    timesteps: list[float]  # the sampler's
    steps: list[int]  # indices into timesteps, consecutive

    def run(self, cuda: bool, limit: int | None = None) -> tuple[list[float], list[bool]]:
        """Milliseconds of each step and whether it ran the blocks after the first (not a cache hit)."""
        self.model._reset_stateful_cache()
        context = diffusers_cache_context(self.model)
        latents, times, computed = self.inputs.hidden_states, [], []
        for i in self.steps[:limit]:
            t, sigma = self.timesteps[i], self.timesteps[i] / 1000.0
            sigma_next = self.timesteps[i + 1] / 1000.0 if i + 1 < len(self.timesteps) else 0.0
            out: list[torch.Tensor] = []
            with context(i, t, sigma, len(self.timesteps)):
                kwargs = self.inputs.at(t) | {"hidden_states": latents}
                times.append(timed_call(lambda: out.append(self.compiled(**kwargs)[0]), cuda))
                computed.append(bool(self._state().should_compute))
            latents = latents + (sigma_next - sigma) * out[0].to(latents.dtype)
        return times, computed

    def _state(self) -> Any:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(self.model.blocks[0])
        return registry.get_hook(FBC_LEADER_HOOK).state_manager.get_state()
