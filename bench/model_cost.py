"""Benchmark 4 - model cost: forward+backward time and peak memory per training step.

3D nets on one (1, 4, P, P, P) patch (batch 2 in --quick), 3 output channels (BraTS):
- DX-Net: the `dxnet_brats` preset (EfficientNet-b0 inflated to 3D, full-resolution stem,
  transposed-conv upsampling), and two ablations (info): nearest upsampling, and nearest
  upsampling without the stem (FlexibleUNet's layout);
- MONAI `FlexibleUNet(backbone="efficientnet-b0", spatial_dims=3, pretrained=False)`;
- MONAI `DynUNet` configured as nnU-Net plans a P^3 patch (5 stages, strides 1,2,2,2,2,
  filters 32..320, instance norm, leaky ReLU);
- DS-Net (`dsnet`, EfficientNet-b0) on the same patch.
2D: Omnia-Net (EfficientNet-b0) on P slices of P x P: the same number of voxels as one patch.
Memory: each model in its own process, the peak RSS of one step (after a warm-up step) above the
RSS before it (VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold fixed, see
EXACT_MALLOC), or torch.cuda.max_memory_allocated on a GPU. Time: all models in one process, `steps` rounds of one step each, interleaved with a
rotating order (load changes on a shared machine hit every model alike), median per model. P is 64 on CPU (batch 1);
`--patch96` gives the issue's 96^3 (meant for a GPU).
Goal: DX-Net <= 1.0x FlexibleUNet-3D (time and memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, median, ratio, run_child, say

# DX-Net ablations (info): where its extra cost over FlexibleUNet sits. FlexibleUNet upsamples by
# interpolation and has no full-resolution stem; the dxnet_brats preset (the paper's layout) has
# transposed-conv upsampling and a 16-channel full-resolution stem feeding the encoder and the
# last decoder block.
DXNET_VARIANTS = {
    "dxnet": {},
    "dxnet_nearest": {"upsample": "nearest"},
    "dxnet_nostem_nearest": {"upsample": "nearest", "stem_channels": 0},
}
# glibc otherwise raises its mmap threshold as big blocks are freed and keeps later ones on the
# heap, so a step's peak RSS depends on what the warm-up step left behind (the same model measured
# 178 and 237 MiB). A fixed threshold maps every block >= 128 KiB afresh and unmaps it when freed:
# the peak RSS of a step is then its peak of live tensors.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MODELS = (*DXNET_VARIANTS, "flexible_unet", "dynunet", "dsnet", "omnianet_slices")
IN_CHANNELS, NUM_CLASSES = 4, 3


class CostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    patch: int
    steps: int
    batch: int = 1  # quick mode needs 2: batch norm at 1 x 1 x 1 needs more than one value
    encoder: str = "efficientnet_b0"  # timm name; MONAI's FlexibleUNet takes "efficientnet-b0"


def settings(opts: BenchOptions) -> CostSettings:
    if opts.quick:
        return CostSettings(patch=32, steps=1, batch=2, encoder="test_efficientnet")
    return CostSettings(patch=96 if opts.patch96 else 64, steps=3)


# ----------------------------------------------------------------------------- builders (child side)
def dynunet_plan(patch: int) -> dict[str, Any]:
    """nnU-Net's rule: halve while the feature map stays >= 4 voxels, at most 5 downsamplings (pure)."""
    strides, size = [1], patch
    while size // 2 >= 4 and len(strides) < 6:
        strides.append(2)
        size //= 2
    filters = [min(32 * 2**i, 320) for i in range(len(strides))]
    return {"kernel_size": [3] * len(strides), "strides": strides, "upsample_kernel_size": strides[1:],
            "filters": filters}


def build(name: str, s: CostSettings) -> tuple[Any, tuple[int, ...]]:
    """(model, input shape) of one benchmarked net."""
    from crossdim.models import create_model

    volume = (s.batch, IN_CHANNELS, s.patch, s.patch, s.patch)
    if name in DXNET_VARIANTS:
        if s.encoder == "efficientnet_b0":
            return create_model("dxnet_brats", pretrained=False, **DXNET_VARIANTS[name]), volume
        return create_model("dxnet", encoder=s.encoder, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                            **DXNET_VARIANTS[name]), volume
    if name == "flexible_unet":
        from monai.networks.nets import FlexibleUNet

        backbone = "efficientnet-b0"  # MONAI has no tiny test backbone; quick mode still uses b0
        return FlexibleUNet(IN_CHANNELS, NUM_CLASSES, backbone, pretrained=False, spatial_dims=3), volume
    if name == "dynunet":
        from monai.networks.nets import DynUNet

        return DynUNet(3, IN_CHANNELS, NUM_CLASSES, **dynunet_plan(s.patch)), volume
    if name == "dsnet":
        return create_model("dsnet", encoder=s.encoder, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES), volume
    if name == "omnianet_slices":
        model = create_model("omnianet", encoder=s.encoder, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
        return model, (s.batch * s.patch, IN_CHANNELS, s.patch, s.patch)
    raise ValueError(f"model: {name!r} is not one of {', '.join(MODELS)}")


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


@dataclass
class Bench:
    """One model ready to step: forward + backward of `x` (synchronised on a GPU)."""

    model: Any
    x: Any

    def step(self) -> float:
        import torch

        self.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self.model(self.x).float().square().mean().backward()
        if self.x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def ready(name: str, s: CostSettings) -> Bench:
    """The model in train mode on the device, with its input, after one warm-up step."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, shape = build(name, s)
    bench = Bench(model.to(device).train(), torch.randn(shape, device=device))
    bench.step()  # one-time allocations, lazy initialisation
    bench.model.zero_grad(set_to_none=True)
    return bench


def measure_memory(name: str, patch: int, steps: int, batch: int, encoder: str) -> dict[str, Any]:
    """Child process, one per model: peak memory of one training step, and the model's facts."""
    import torch

    bench = ready(name, CostSettings(patch=patch, steps=steps, batch=batch, encoder=encoder))
    return {"peak_mib": peak_step_memory(bench.step, bench.x.device),
            "params": sum(p.numel() for p in bench.model.parameters()), "device": bench.x.device.type,
            "input": list(bench.x.shape), "threads": torch.get_num_threads()}


def measure_times(names: list[str], patch: int, steps: int, batch: int, encoder: str) -> dict[str, list[float]]:
    """Child process: step times of every model, interleaved (round r times each model once, the
    order rotating), so a change in the machine's load hits all models alike."""
    s = CostSettings(patch=patch, steps=steps, batch=batch, encoder=encoder)
    benches = {name: ready(name, s) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(benches[name].step())
    return times


def peak_step_memory(step: Any, device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = vm_kib("VmRSS")
    reset_peak_rss()
    step()
    return (vm_kib("VmHWM") - before) / 1024


def profile_ops(name: str, patch: int, top: int = 12, encoder: str = "efficientnet_b0", batch: int = 1) -> list[str]:
    """Where a model's step goes: the `top` torch ops by self CPU time over one forward+backward.

    `python -m bench.child bench.model_cost.profile_ops '{"name": "dxnet", "patch": 64}'`
    """
    from torch.profiler import ProfilerActivity, profile

    bench = ready(name, CostSettings(patch=patch, steps=1, batch=batch, encoder=encoder))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [f"{e.key}: {e.self_cpu_time_total / 1e6:.2f} s ({100 * e.self_cpu_time_total / total:.0f}%), "
            f"{e.count} calls" for e in events[:top]]


# ----------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class Cost:
    seconds: float  # median step time
    peak_mib: float
    facts: dict[str, Any]


def figures(costs: dict[str, Cost]) -> list[Figure]:
    out = []
    for name, c in costs.items():
        f = c.facts
        out.append(Figure(f"model_{name}_step_s", c.seconds, " s",
                          note=f"input {'x'.join(map(str, f['input']))}, {f['params'] / 1e6:.2f}M params, "
                               f"{f['device']}, {f['threads']} thread(s)"))
        out.append(Figure(f"model_{name}_step_peak_mib", c.peak_mib, " MiB"))
    dx, flex = costs["dxnet"], costs["flexible_unet"]
    out += [
        Figure("model_dxnet_vs_flexible_unet_time", ratio(dx.seconds, flex.seconds, "flexible_unet time"), "x",
               Goal("<=", 1.0)),
        Figure("model_dxnet_vs_flexible_unet_memory", ratio(dx.peak_mib, flex.peak_mib, "flexible_unet memory"),
               "x", Goal("<=", 1.0)),
    ]
    for variant in list(DXNET_VARIANTS)[1:]:
        c = costs[variant]
        out.append(Figure(f"model_{variant}_vs_flexible_unet_time", ratio(c.seconds, flex.seconds, "time"), "x"))
        out.append(Figure(f"model_{variant}_vs_flexible_unet_memory", ratio(c.peak_mib, flex.peak_mib, "memory"),
                          "x"))
    for other in ("dynunet", "dsnet", "omnianet_slices"):
        c = costs[other]
        out.append(Figure(f"model_dxnet_vs_{other}_time", ratio(dx.seconds, c.seconds, f"{other} time"), "x"))
        out.append(Figure(f"model_dxnet_vs_{other}_memory", ratio(dx.peak_mib, c.peak_mib, f"{other} memory"), "x"))
    return out


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    memory = {}
    for name in MODELS:
        say(f"model_cost: memory of {name} at {s.patch}^3")
        memory[name] = run_child("bench.model_cost.measure_memory", {"name": name, **s.model_dump()}, opts.threads,
                                 env=EXACT_MALLOC)
    say(f"model_cost: step times, {s.steps} interleaved rounds")
    times = run_child("bench.model_cost.measure_times", {"names": list(MODELS), **s.model_dump()}, opts.threads)
    costs = {name: Cost(median(times.result[name]), memory[name].result["peak_mib"], memory[name].result)
             for name in MODELS}
    return emit(figures(costs))
