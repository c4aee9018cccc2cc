"""Synthetic BraTS-like data for the benchmarks, cached under the work directory.

`raw_dataset(spec, workdir)` writes NIfTI cases in the BraTS 2021 layout (4 MRI channels + seg,
isotropic 1 mm, so MONAI needs no resampling); `shard_dataset` preprocesses them with the real
`crossdim.data.job.run_preprocess` into Parquet shards. Both are reused while their completion
marker / manifest exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

from pydantic import BaseModel, ConfigDict, Field

from bench.common import ensure_ray, say

DONE_MARKER = ".bench-complete"


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: int = Field(ge=2)
    size: int = Field(ge=16)  # voxels along each axis
    seed: int = 0

    @property
    def key(self) -> str:
        return f"brats-{self.cases}x{self.size}-seed{self.seed}"


def raw_dataset(spec: DatasetSpec, workdir: str) -> str:
    """The raw NIfTI dataset root for `spec` (written once)."""
    from crossdim.data.synth import write_synthetic

    root = os.path.join(workdir, "raw-" + spec.key)
    if os.path.exists(os.path.join(root, DONE_MARKER)):
        return root
    shutil.rmtree(root, ignore_errors=True)
    say(f"writing {spec.cases} synthetic BraTS cases of {spec.size}^3 to {root}")
    write_synthetic("brats", root, spec.cases, spec.seed, shape=(spec.size,) * 3, spacing=(1.0, 1.0, 1.0))
    open(os.path.join(root, DONE_MARKER), "w").close()
    return root


def shard_dataset(spec: DatasetSpec, workdir: str) -> str:
    """The preprocessed (sharded) dataset for `spec`: a local directory holding manifest.json."""
    from crossdim.config import PreprocessConfig
    from crossdim.data.job import run_preprocess

    out = os.path.join(workdir, "shards-" + spec.key)
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    raw = raw_dataset(spec, workdir)
    ensure_ray()
    say(f"preprocessing {raw} -> {out}")
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not figures
        run_preprocess(PreprocessConfig(format="brats", input=raw, output=out), progress=False)
    return out


def nifti_items(raw_root: str) -> list[dict[str, object]]:
    """MONAI dictionary items {"image": [4 channel files], "label": seg file} of a raw dataset."""
    from crossdim.data.formats import get_format

    info = get_format("brats").read_dataset(raw_root)
    return [{"image": list(case.images), "label": case.label} for case in sorted(info.cases, key=lambda c: c.id)]
