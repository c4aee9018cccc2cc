"""Benchmark 1 - training ingest: patches/s delivered to a training worker, and peak memory.

Sides, each in its own process (clean memory), on the same synthetic BraTS-like cases:
- crossdim: shards read with `crossdim.data.shards.iter_cases` (checksummed pyarrow reader),
  decoded once and held in the shards' float16 as a training worker holds them
  (`load_cases(..., keep_dtype=True)`), patches drawn by the real training sampler
  (`PatchSampler`, float32 out);
- MONAI uncached: `LoadImaged` + `EnsureChannelFirstd` + `Orientationd` + `NormalizeIntensityd`
  + `RandCropByPosNegLabeld` over the raw NIfTI files in a `DataLoader` with 2 workers;
- MONAI `CacheDataset`: the same transforms, the deterministic ones cached (cache_rate 1.0).
All sides deliver batches of `patches_per_batch` patches (MONAI: `num_samples` crops of one
volume; foreground share 1/3 on both sides: pos=1, neg=2 vs foreground_ratio 0.33), no
augmentation. Throughput is measured after the first batch ("steady"); the time to the first
batch (startup: reading/decoding, cache filling, worker start) is reported separately. Memory:
peak private memory (anonymous + shared-memory PSS, see bench.common.Memory) summed over each
side's process tree (DataLoader workers included); total PSS is in the note.
Goals: >= 5x the uncached pipeline, >= 1x CacheDataset at <= half its memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, ChildResult, Figure, Goal, emit, own_private_mib, ratio, run_child, say
from bench.data import DatasetSpec, nifti_items, raw_dataset, shard_dataset

FOREGROUND_RATIO = 0.33  # crossdim's default; MONAI pos=1, neg=2 gives the same share


class IngestSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DatasetSpec
    patch: int  # cubic patch edge
    patches_per_batch: int = 4
    crossdim_batches: int
    monai_uncached_epochs: int
    monai_cache_epochs: int
    loader_workers: int = 2


def settings(opts: BenchOptions) -> IngestSettings:
    if opts.quick:
        return IngestSettings(data=DatasetSpec(cases=4, size=40), patch=32, crossdim_batches=10,
                              monai_uncached_epochs=1, monai_cache_epochs=1)
    return IngestSettings(data=DatasetSpec(cases=16, size=96), patch=64, crossdim_batches=100,
                          monai_uncached_epochs=1, monai_cache_epochs=2)


# ----------------------------------------------------------------------------- sides (child processes)
def crossdim_side(uri: str, patch: int, patches_per_batch: int, batches: int) -> dict[str, Any]:
    """Read + decode every case from the shards, then draw `batches` batches with the training sampler."""
    import torch  # noqa: F401 - a training worker has torch loaded: part of the baseline, as on the MONAI side

    from crossdim.data.sampling import PatchSampler, SampleSpec
    from crossdim.data.shards import iter_cases

    baseline = own_private_mib()
    start = time.perf_counter()
    cases = list(iter_cases(uri, keep_dtype=True))  # as a training worker holds them (load_cases)
    sampler = PatchSampler(cases, SampleSpec((patch,) * 3, FOREGROUND_RATIO), seed=0, augment=None)
    x, _ = as_tensors(*sampler.batch(patches_per_batch))
    shape = list(x.shape)
    startup = time.perf_counter() - start
    steady = time.perf_counter()
    delivered = 0
    for _ in range(batches):
        x, _ = as_tensors(*sampler.batch(patches_per_batch))
        delivered += x.shape[0]
    seconds = time.perf_counter() - steady
    return {"startup_s": startup, "patches": delivered, "seconds": seconds,
            "batch_shape": shape, "cases": len(cases), "baseline_private_mib": baseline}


def as_tensors(images: Any, labels: Any) -> tuple[Any, Any]:
    """A sampler batch as the training worker takes it (torch tensors sharing the arrays' memory)."""
    import torch

    return torch.from_numpy(images), torch.from_numpy(labels)


def monai_transforms(patch: int, num_samples: int) -> Any:
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
    )

    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(patch,) * 3, pos=1, neg=2,
                               num_samples=num_samples, image_key="image", image_threshold=0),
    ])


def monai_side(items: list[dict[str, Any]], patch: int, patches_per_batch: int, epochs: int, cached: bool,
               workers: int) -> dict[str, Any]:
    """MONAI Dataset (or CacheDataset) + DataLoader; `epochs` passes over the cases."""
    from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate

    baseline = own_private_mib()
    start = time.perf_counter()
    transform = monai_transforms(patch, patches_per_batch)
    if cached:
        dataset = CacheDataset(items, transform, cache_rate=1.0, num_workers=workers, progress=False)
    else:
        dataset = Dataset(items, transform)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers, collate_fn=list_data_collate,
                        persistent_workers=workers > 0)
    batches = epochs_of(loader, epochs)
    shape = list(next(batches)["image"].shape)
    startup = time.perf_counter() - start
    steady, delivered = time.perf_counter(), 0
    for batch in batches:
        delivered += int(batch["image"].shape[0])
    return {"startup_s": startup, "patches": delivered, "seconds": time.perf_counter() - steady,
            "batch_shape": shape, "cases": len(items), "baseline_private_mib": baseline}


def epochs_of(loader: Any, epochs: int) -> Iterator[Any]:
    for _ in range(epochs):
        yield from loader


# ----------------------------------------------------------------------------- driver
def rate(side: ChildResult) -> float:
    return ratio(side.result["patches"], side.result["seconds"], "patches/s")


def run_sides(s: IngestSettings, opts: BenchOptions) -> dict[str, ChildResult]:
    raw = raw_dataset(s.data, opts.workdir)
    shards = shard_dataset(s.data, opts.workdir)
    items = nifti_items(raw)
    monai = {"items": items, "patch": s.patch, "patches_per_batch": s.patches_per_batch, "workers": s.loader_workers}
    sides = {}
    say("ingest: crossdim shards + PatchSampler")
    sides["crossdim"] = run_child("bench.ingest.crossdim_side", {
        "uri": shards, "patch": s.patch, "patches_per_batch": s.patches_per_batch, "batches": s.crossdim_batches,
    }, opts.threads)
    say("ingest: MONAI Dataset (uncached) + DataLoader")
    sides["monai_uncached"] = run_child("bench.ingest.monai_side",
                                        {**monai, "epochs": s.monai_uncached_epochs, "cached": False}, opts.threads)
    say("ingest: MONAI CacheDataset + DataLoader")
    sides["monai_cache"] = run_child("bench.ingest.monai_side",
                                     {**monai, "epochs": s.monai_cache_epochs, "cached": True}, opts.threads)
    return sides


def figures(sides: dict[str, ChildResult], s: IngestSettings) -> list[Figure]:
    ours, uncached, cache = sides["crossdim"], sides["monai_uncached"], sides["monai_cache"]
    label = f"{s.data.cases} cases {s.data.size}^3 x4ch, patch {s.patch}^3, {s.patches_per_batch}/batch"
    out = [Figure(f"ingest_{name}_patches_per_s", rate(side), " patches/s", note=label if name == "crossdim" else "")
           for name, side in sides.items()]
    out += [Figure(f"ingest_{name}_startup_s", side.result["startup_s"], " s") for name, side in sides.items()]
    out += [Figure(f"ingest_{name}_peak_private_mib", side.peak_private_mib, " MiB",
                   note=f"{side.peak_private_mib - side.result['baseline_private_mib']:.0f} MiB above its imports; "
                        f"PSS incl. libraries {side.peak_pss_mib:.0f} MiB")
            for name, side in sides.items()]
    out += [
        Figure("ingest_speedup_vs_monai_uncached", ratio(rate(ours), rate(uncached), "uncached rate"), "x", Goal(">=", 5.0)),
        Figure("ingest_speedup_vs_monai_cache", ratio(rate(ours), rate(cache), "cache rate"), "x", Goal(">=", 1.0)),
        Figure("ingest_memory_vs_monai_cache", ratio(ours.peak_private_mib, cache.peak_private_mib, "cache memory"), "x",
               Goal("<=", 0.5)),
    ]
    return out


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    return emit(figures(run_sides(s, opts), s))
