"""Prediction outputs as NIfTI, on the input's grid: label maps (uint8) and probability maps
(float32, one channel per class on the 4th axis). A NIfTI input's header (qform/sform codes,
units, description) is carried over; other inputs get a fresh header from their affine.
Destinations may be local paths or s3:// URIs (crossdim.storage).
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from crossdim import storage
from crossdim.infer.sources import NIFTI_ENDINGS

LABEL_SUFFIX = ".nii.gz"
PROBABILITY_SUFFIX = "_probabilities.nii.gz"


def reference_header(reference: str) -> nib.Nifti1Header | None:
    """The header of a NIfTI input file (None for DICOM/ITK inputs or unreadable headers)."""
    if not reference.lower().endswith(NIFTI_ENDINGS):
        return None
    try:
        image = nib.load(reference)
    except Exception:  # noqa: BLE001 - the input was readable before; fall back to a fresh header
        return None
    return image.header.copy() if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)) else None


def nifti_image(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None) -> nib.Nifti1Image:
    """A NIfTI image of `array` on `affine`, keeping the reference header's codes (pure)."""
    image = nib.Nifti1Image(array, affine, header=header)
    image.set_data_dtype(array.dtype)
    if header is not None:
        image.set_qform(affine, code=int(header["qform_code"]) or 1)
        image.set_sform(affine, code=int(header["sform_code"]) or 1)
    else:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    return image


def nifti_bytes(image: nib.Nifti1Image, compress: bool = True) -> bytes:
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=4) if compress else raw


def write_file(uri: str, data: bytes) -> None:
    """Write bytes as they are. (On S3, pyarrow's output streams compress by file extension by
    default, which would gzip a .nii.gz a second time: ask for no compression.)"""
    if not storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_output_stream(path, compression=None) as stream:
            stream.write(data)
    except OSError as exc:
        raise storage.StorageError(f"{uri}: cannot write ({str(exc).splitlines()[0][:200]})") from None


def write_labels(uri: str, labels: np.ndarray, affine: np.ndarray, reference: str = "") -> str:
    header = reference_header(reference) if reference else None
    image = nifti_image(np.ascontiguousarray(labels, dtype=np.uint8), affine, header)
    write_file(uri, nifti_bytes(image, compress=not uri.endswith(".nii")))
    return uri


def write_probabilities(uri: str, probs: np.ndarray, affine: np.ndarray, reference: str = "") -> str:
    """(K, *spatial) -> a float32 NIfTI with the K channels on the axis after the spatial ones."""
    header = reference_header(reference) if reference else None
    if header is not None:
        header = header.copy()
        header.set_intent("none")
    array = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32), 0, -1))
    image = nifti_image(array, affine, header)
    write_file(uri, nifti_bytes(image, compress=not uri.endswith(".nii")))
    return uri
