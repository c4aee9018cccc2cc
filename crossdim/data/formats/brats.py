"""BraTS layout: one folder per case holding one NIfTI per MRI sequence plus `_seg`.

Two namings are detected from the case folder names (a root mixing them is rejected):
- 2021 (also 2020): `BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz`,
  labels 0, 1 (NCR), 2 (ED), 4 (ET); label_convention "brats2021".
- 2023+ (GLI, MEN, MET, PED, SSA): `BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz`,
  labels 0, 1 (NETC), 2 (SNFH), 3 (ET); label_convention "brats2023".
Channel order maps to the same physical sequences in both: FLAIR, T1, T1 contrast-enhanced, T2
(2021: flair, t1, t1ce, t2; 2023: t2f, t1n, t1c, t2w); `channel_modalities` carries these common
names. Regions (multi-label targets): ET, TC = ET + necrotic core, WT = TC + edema.
A case missing a sequence file is listed with the expected path (load_case raises DataError
naming it). If no case has a seg file the dataset is unlabelled (validation data, label None);
if some have one, a case without it fails at load_case.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from crossdim.data.formats.base import Case, DataError, DatasetInfo, LoadedCase
from crossdim.data.formats.io import first_existing, labelled_or_none, load_files_case, require_dir

CHANNEL_MODALITIES = ["FLAIR", "T1", "T1CE", "T2"]


@dataclass(frozen=True)
class Naming:
    convention: str
    folder: re.Pattern[str]
    separator: str  # between the case id and the suffix in file names
    channels: tuple[str, ...]
    labels: dict[int, str]
    regions: dict[str, list[int]]


NAMINGS = (
    Naming(
        convention="brats2021",
        folder=re.compile(r"^BraTS(20)?\d\d_(Training_|Validation_)?\d+$"),
        separator="_",
        channels=("flair", "t1", "t1ce", "t2"),
        labels={0: "background", 1: "necrotic tumor core", 2: "peritumoral edema", 4: "enhancing tumor"},
        regions={"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]},
    ),
    Naming(
        convention="brats2023",
        folder=re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"),
        separator="-",
        channels=("t2f", "t1n", "t1c", "t2w"),
        labels={0: "background", 1: "non-enhancing tumor core", 2: "surrounding FLAIR hyperintensity",
                3: "enhancing tumor"},
        regions={"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]},
    ),
)


def read_dataset(root: str) -> DatasetInfo:
    require_dir(root)
    naming, folders = _detect(root)
    label_paths = labelled_or_none([_file(root, f, naming, "seg") for f in folders])
    cases = [
        Case(id=folder, images=tuple(_file(root, folder, naming, c) for c in naming.channels),
             label=label, extra=(("convention", naming.convention),))
        for folder, label in zip(folders, label_paths)
    ]
    return DatasetInfo(
        format="brats", name=os.path.basename(os.path.abspath(root)), modality="MR",
        channel_names=list(naming.channels), labels=dict(naming.labels), spatial_dims=3, cases=cases,
        regions={k: list(v) for k, v in naming.regions.items()},
        channel_modalities=list(CHANNEL_MODALITIES), label_convention=naming.convention,
    )


def load_case(case: Case, info: DatasetInfo) -> LoadedCase:
    return load_files_case(case, info.labels, info.spatial_dims)


def naming_for(convention: str) -> Naming:
    for naming in NAMINGS:
        if naming.convention == convention:
            return naming
    raise ValueError(f"unknown BraTS label convention {convention!r}; valid: brats2021, brats2023")


def _detect(root: str) -> tuple[Naming, list[str]]:
    folders = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    matched = {naming.convention: [f for f in folders if naming.folder.match(f)] for naming in NAMINGS}
    present = [naming for naming in NAMINGS if matched[naming.convention]]
    if not present:
        raise DataError(f"{root}: no BraTS case folders (BraTS2021_NNNNN or BraTS-XXX-NNNNN-NNN) found")
    if len(present) > 1:
        raise DataError(f"{root}: mixes 2021-style and 2023-style BraTS case folders")
    return present[0], matched[present[0].convention]


def _file(root: str, folder: str, naming: Naming, suffix: str) -> str:
    stem = os.path.join(root, folder, f"{folder}{naming.separator}{suffix}")
    return first_existing([stem + ".nii.gz", stem + ".nii"])
