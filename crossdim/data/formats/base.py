"""What every layout reader returns: a DatasetInfo listing Cases, and LoadedCase arrays.

Contract shared by the readers (formats/*.py), the preprocessing job and inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class DataError(ValueError):
    """Bad input data. The message names the offending file or field (one line)."""


@dataclass(frozen=True)
class Case:
    id: str
    images: tuple[str, ...]  # one entry per channel: a file path, or a DICOM series directory
    label: str | None = None  # label file/dir, None for unlabelled (test) cases
    extra: tuple[tuple[str, str], ...] = ()  # reader-specific hints (e.g. ("view", "2CH"))


@dataclass
class DatasetInfo:
    format: str  # "msd" | "brats" | "camus" | "chaos"
    name: str
    modality: Literal["MR", "CT", "US", "other"]
    channel_names: list[str]
    # label value stored in arrays -> class name; 0 is background. For BraTS the raw values
    # (0,1,2,4 for 2021 naming, 0,1,2,3 for 2023+) are kept; `regions` says how to build targets.
    labels: dict[int, str]
    spatial_dims: Literal[2, 3]
    cases: list[Case]
    # Multi-label region targets, name -> raw label values that belong to it
    # (BraTS: {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}). Empty -> multi-class (softmax) target.
    regions: dict[str, list[int]] = field(default_factory=dict)
    # Per-channel modality when channels differ (MSD dataset.json "modality"); else modality above.
    channel_modalities: list[str] = field(default_factory=list)
    label_convention: str = ""  # e.g. "brats2021" | "brats2023": needed to invert predictions


@dataclass
class LoadedCase:
    id: str
    image: np.ndarray  # float32, (C, *spatial) in the file's own voxel order
    label: np.ndarray | None  # uint8, (*spatial), values as in DatasetInfo.labels
    affine: np.ndarray  # 4x4 float64 voxel -> world (RAS mm for NIfTI/ITK/DICOM alike)
    source_files: tuple[str, ...] = ()
