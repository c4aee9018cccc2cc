"""CAMUS echocardiography layout: `patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}[_gt].{mhd,nii.gz}`.

One 2D case per patient x view x phase, id e.g. "patient0001_2CH_ED" (the `_sequence` files are
ignored). The release is detected from the files: MetaImage (`.mhd` + `.raw`, read with
SimpleITK) or NIfTI (`.nii.gz`, nibabel); a root holding both is rejected. Images are returned
as (1, x, y) float32 and labels (x, y) uint8: 0 background, 1 LV endocardium (cavity),
2 myocardium, 3 left atrium. 2D files stored with a trailing singleton axis are squeezed.
A case is listed when its image or its `_gt` exists; the missing one makes load_case raise.
If no `_gt` file exists at all the dataset is unlabelled (label None).
"""

from __future__ import annotations

import os
import re

from crossdim.data.formats.base import Case, DataError, DatasetInfo, LoadedCase
from crossdim.data.formats.io import labelled_or_none, load_files_case, require_dir

VIEWS = ("2CH", "4CH")
PHASES = ("ED", "ES")
LABELS = {0: "background", 1: "LV endocardium", 2: "myocardium", 3: "left atrium"}
RELEASE_ENDINGS = {"mhd": ".mhd", "nifti": ".nii.gz"}
_PATIENT = re.compile(r"^patient\d+$")


def read_dataset(root: str) -> DatasetInfo:
    require_dir(root)
    patients = sorted(n for n in os.listdir(root) if _PATIENT.match(n) and os.path.isdir(os.path.join(root, n)))
    if not patients:
        raise DataError(f"{root}: no CAMUS patient folders (patientNNNN) found")
    release = detect_release(root, patients)
    pairs = [pair for patient in patients for pair in _patient_files(root, patient, release)]
    labels = labelled_or_none([label for _, _, label in pairs])
    cases = [
        Case(id=case_id, images=(image,), label=label,
             extra=(("patient", case_id.split("_")[0]), ("view", case_id.split("_")[1]),
                    ("phase", case_id.split("_")[2]), ("release", release)))
        for (case_id, image, _), label in zip(pairs, labels)
    ]
    return DatasetInfo(
        format="camus", name=os.path.basename(os.path.abspath(root)), modality="US",
        channel_names=["US"], labels=dict(LABELS), spatial_dims=2, cases=cases,
    )


def load_case(case: Case, info: DatasetInfo) -> LoadedCase:
    return load_files_case(case, info.labels, info.spatial_dims)


def detect_release(root: str, patients: list[str]) -> str:
    """"mhd" or "nifti", from which ED/ES image files exist."""
    found = {
        release for patient in patients for release, ending in RELEASE_ENDINGS.items()
        for view in VIEWS for phase in PHASES
        if os.path.exists(os.path.join(root, patient, f"{patient}_{view}_{phase}{ending}"))
    }
    if len(found) > 1:
        raise DataError(f"{root}: holds both the MetaImage (.mhd) and the NIfTI CAMUS release; keep one")
    if not found:
        raise DataError(f"{root}: no CAMUS patientNNNN_{{2CH,4CH}}_{{ED,ES}} .mhd or .nii.gz images found")
    return found.pop()


def _patient_files(root: str, patient: str, release: str) -> list[tuple[str, str, str]]:
    """(case id, image path, label path) for each view x phase with an image or a label file."""
    ending = RELEASE_ENDINGS[release]
    out = []
    for view in VIEWS:
        for phase in PHASES:
            case_id = f"{patient}_{view}_{phase}"
            image = os.path.join(root, patient, case_id + ending)
            label = os.path.join(root, patient, f"{case_id}_gt{ending}")
            if os.path.exists(image) or os.path.exists(label):
                out.append((case_id, image, label))
    return out
