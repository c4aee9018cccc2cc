"""Medical Segmentation Decathlon / nnU-Net v2 raw layout: `dataset.json`, `imagesTr/`, `labelsTr/`.

Two `dataset.json` dialects are accepted (detected by their keys):
- MSD: `modality` {"0": "CT"}, `labels` {"0": "background", ...}, `training` list of
  {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}; multi-channel images are
  one 4D NIfTI with channels on the last axis (Case.images repeats that path once per channel).
- nnU-Net v2: `channel_names` {"0": "T2"}, `labels` {"background": 0, ...} (region-based entries
  with lists of values become `DatasetInfo.regions`), `file_ending`, `numTraining`; cases are
  found in `imagesTr/<case>_<XXXX><file_ending>` and `labelsTr/<case><file_ending>`.
Only training cases are listed. A case missing a channel file or its label is still listed with
the expected path; `load_case` then raises DataError naming the missing file. If `labelsTr` holds
no label file at all, the cases are unlabelled (label None).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from crossdim.data.formats.base import Case, DataError, DatasetInfo, LoadedCase
from crossdim.data.formats.io import labelled_or_none, load_files_case, require_dir, require_file

CT_NAMES = {"ct"}
US_NAMES = {"us", "ultrasound"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1gd", "t1ce", "t1c", "t2", "t2w", "flair", "adc", "dwi",
            "pd", "t2spir", "t1dual", "cine", "lge", "de"}
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def read_dataset(root: str) -> DatasetInfo:
    require_dir(root)
    meta_path = os.path.join(root, "dataset.json")
    meta = _read_json(meta_path)
    if "channel_names" in meta:
        return _read_nnunetv2(root, meta_path, meta)
    if "modality" in meta:
        return _read_msd(root, meta_path, meta)
    raise DataError(f"{meta_path}: neither 'modality' (MSD) nor 'channel_names' (nnU-Net v2) is present")


def load_case(case: Case, info: DatasetInfo) -> LoadedCase:
    return load_files_case(case, info.labels, info.spatial_dims)


def _read_json(path: str) -> dict[str, Any]:
    require_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: top level must be an object")
    return meta


def _field(meta: dict[str, Any], key: str, kind: type, meta_path: str) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind):
        raise DataError(f"{meta_path}: field '{key}' is missing or not a {kind.__name__}")
    return value


def _indexed_names(mapping: dict[str, Any], key: str, meta_path: str) -> list[str]:
    """{"0": "T2", "1": "ADC"} -> ["T2", "ADC"]; keys must be 0..n-1."""
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except ValueError as exc:
        raise DataError(f"{meta_path}: field '{key}' keys must be channel indices") from exc
    if sorted(indexed) != list(range(len(indexed))) or not indexed:
        raise DataError(f"{meta_path}: field '{key}' keys must be 0..n-1, got {sorted(indexed)}")
    return [indexed[i] for i in range(len(indexed))]


def modality_of(channel_names: list[str]) -> str:
    """Overall modality from per-channel names: CT / MR / US when all agree, else "other"."""
    kinds = set()
    for name in channel_names:
        low = name.strip().lower()
        kinds.add("CT" if low in CT_NAMES else "US" if low in US_NAMES else "MR" if low in MR_NAMES else "other")
    return kinds.pop() if len(kinds) == 1 else "other"


def _check_count(meta: dict[str, Any], found: int, meta_path: str) -> None:
    declared = meta.get("numTraining")
    if declared is not None and declared != found:
        raise DataError(f"{meta_path}: numTraining is {declared} but {found} training cases were found")
    if found == 0:
        raise DataError(f"{meta_path}: no training cases")


def _unique_sorted(cases: list[Case], meta_path: str) -> list[Case]:
    ids = [case.id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{meta_path}: duplicate case ids {duplicates[:5]}")
    return sorted(cases, key=lambda case: case.id)


# --- MSD dialect --------------------------------------------------------------------------------


def msd_labels(mapping: dict[str, Any], meta_path: str) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in mapping.items()}
    except ValueError as exc:
        raise DataError(f"{meta_path}: field 'labels' keys must be integers (MSD dialect)") from exc


def _msd_case(root: str, entry: Any, channels: int, meta_path: str) -> Case:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DataError(f"{meta_path}: each 'training' entry needs an 'image' path, got {entry!r:.80}")
    image = os.path.normpath(os.path.join(root, entry["image"]))
    label = entry.get("label")
    label_path = os.path.normpath(os.path.join(root, label)) if isinstance(label, str) else None
    case_id = os.path.basename(image).removesuffix(".gz").removesuffix(".nii")
    return Case(id=case_id, images=(image,) * channels, label=label_path, extra=(("dialect", "msd"),))


def _read_msd(root: str, meta_path: str, meta: dict[str, Any]) -> DatasetInfo:
    channel_names = _indexed_names(_field(meta, "modality", dict, meta_path), "modality", meta_path)
    labels = msd_labels(_field(meta, "labels", dict, meta_path), meta_path)
    training = _field(meta, "training", list, meta_path)
    cases = [_msd_case(root, entry, len(channel_names), meta_path) for entry in training]
    _check_count(meta, len(cases), meta_path)
    return DatasetInfo(
        format="msd", name=str(meta.get("name", os.path.basename(os.path.abspath(root)))),
        modality=modality_of(channel_names), channel_names=channel_names, labels=labels,
        spatial_dims=_spatial_dims(meta), cases=_unique_sorted(cases, meta_path),
        channel_modalities=channel_names,
    )


def _spatial_dims(meta: dict[str, Any]) -> int:
    return 2 if str(meta.get("tensorImageSize", "3D")).upper() == "2D" else 3


# --- nnU-Net v2 dialect -------------------------------------------------------------------------


def nnunet_labels(mapping: dict[str, Any], meta_path: str) -> tuple[dict[int, str], dict[str, list[int]]]:
    """nnU-Net v2 `labels` -> (raw value -> name, regions). Any list value makes it region-based:
    then every non-background entry is a region and raw values are named by their int entry."""
    def values(name: str, value: Any) -> list[int]:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise DataError(f"{meta_path}: label '{name}' must be an int or a list of ints")
        return list(items)

    parsed = {name: values(name, value) for name, value in mapping.items()}
    if not any(isinstance(value, list) for value in mapping.values()):
        return {vals[0]: name for name, vals in parsed.items()}, {}
    names = {vals[0]: name for name, vals in parsed.items() if not isinstance(mapping[name], list)}
    raw = sorted({v for vals in parsed.values() for v in vals} | {0})
    labels = {v: names.get(v, f"label_{v}") for v in raw}
    regions = {name: vals for name, vals in parsed.items() if vals != [0]}
    return labels, regions


def _nnunet_case_ids(images_dir: str, labels_dir: str, ending: str) -> list[str]:
    ids: set[str] = set()
    for name in _listdir(images_dir):
        match = _CHANNEL_FILE.match(name.removesuffix(ending)) if name.endswith(ending) else None
        if match:
            ids.add(match["case"])
    ids.update(name.removesuffix(ending) for name in _listdir(labels_dir) if name.endswith(ending))
    return sorted(ids)


def _listdir(path: str) -> list[str]:
    """Visible entries of a directory ('.'-prefixed files such as macOS '._x' are skipped)."""
    if not os.path.isdir(path):
        return []
    return [name for name in os.listdir(path) if not name.startswith(".")]


def _read_nnunetv2(root: str, meta_path: str, meta: dict[str, Any]) -> DatasetInfo:
    channel_names = _indexed_names(_field(meta, "channel_names", dict, meta_path), "channel_names", meta_path)
    labels, regions = nnunet_labels(_field(meta, "labels", dict, meta_path), meta_path)
    ending = _field(meta, "file_ending", str, meta_path)
    images_dir, labels_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
    ids = _nnunet_case_ids(images_dir, labels_dir, ending)
    label_paths = labelled_or_none([os.path.join(labels_dir, i + ending) for i in ids])
    cases = [
        Case(id=i, images=tuple(os.path.join(images_dir, f"{i}_{c:04d}{ending}") for c in range(len(channel_names))),
             label=label, extra=(("dialect", "nnunetv2"),))
        for i, label in zip(ids, label_paths)
    ]
    _check_count(meta, len(cases), meta_path)
    return DatasetInfo(
        format="msd", name=str(meta.get("name", os.path.basename(os.path.abspath(root)))),
        modality=modality_of(channel_names), channel_names=channel_names, labels=labels,
        spatial_dims=_spatial_dims(meta), cases=cases, regions=regions, channel_modalities=channel_names,
    )
