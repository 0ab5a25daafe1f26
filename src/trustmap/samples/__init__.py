"""Small synthetic images shipped with trustmap, for the README, the docs and first tries.

Every file is a phantom case (``trustmap.data.phantoms``, seed 0), not patient data:

=====================  ===================================================================
``ct_nodule.dcm``      a 64 x 64 lung CT patch in Hounsfield units (CT Image Storage,
                       RescaleSlope/Intercept), with a malignant-looking nodule
``chest_xray.png``     a 128 x 128 chest radiograph with a pneumothorax
``chest_xray_mask.png`` the pneumothorax's ground-truth mask (0/255)
``brain.nii.gz``       a 32^3 FLAIR-like head volume with a lesion (1 mm voxels)
=====================  ===================================================================

>>> from trustmap.samples import sample
>>> from trustmap.io import load
>>> ct = load(sample("ct_nodule.dcm"), window="lung")   # windowed to [0, 1]

:func:`write_samples` regenerates them (the tests check that the shipped files hold what
it writes).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

__all__ = ["SAMPLES", "sample", "write_samples"]

SAMPLES = ("ct_nodule.dcm", "chest_xray.png", "chest_xray_mask.png", "brain.nii.gz")
_HERE = Path(__file__).resolve().parent


def sample(name: str) -> Path:
    """The path of a shipped sample file (one of :data:`SAMPLES`)."""
    if name not in SAMPLES:
        close = difflib.get_close_matches(name, SAMPLES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"no sample named {name!r}{hint} (samples: {', '.join(SAMPLES)})")
    return _HERE / name


def _first(name: str, label: int, **options: object):
    """The first case of phantom ``name`` (seed 0) with ``label``."""
    from trustmap.data.phantoms import generate

    for case in generate(name, 40, seed=0, **options):
        if case.label == label and (case.mask is None or case.mask.any()):
            return case
    raise RuntimeError(f"no case with label {label} among the first 40 of {name}")


def write_samples(folder: str | Path) -> list[Path]:
    """Generate every sample into ``folder``; returns the paths written."""
    import nibabel as nib
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    ct = _first("ct-nodule", 1)
    hu = np.asarray(ct.image, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    # Fixed UIDs under the 2.25 (UUID-derived) root: the file is the same on every run.
    meta.MediaStorageSOPInstanceUID = "2.25.2020202020202020202020202020202001"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out / "ct_nodule.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "2.25.2020202020202020202020202020202002"
    ds.SeriesInstanceUID = "2.25.2020202020202020202020202020202003"
    ds.FrameOfReferenceUID = "2.25.2020202020202020202020202020202004"
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Nodule"
    ds.PatientID = "TRUSTMAP-SAMPLE"
    ds.SeriesDescription = "trustmap ct-nodule phantom, seed 0 (synthetic)"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelData = hu.tobytes()
    pydicom.dcmwrite(out / "ct_nodule.dcm", ds, enforce_file_format=True)
    written.append(out / "ct_nodule.dcm")

    cxr = _first("cxr-pneumothorax", 1)
    Image.fromarray(np.asarray(cxr.image, dtype=np.uint8)).save(out / "chest_xray.png")
    mask = (np.asarray(cxr.mask) > 0).astype(np.uint8) * 255
    Image.fromarray(mask).save(out / "chest_xray_mask.png")
    written += [out / "chest_xray.png", out / "chest_xray_mask.png"]

    brain = _first("mri-brain-3d", 1, size=32, template="procedural")
    volume = np.asarray(brain.image, dtype=np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), out / "brain.nii.gz")
    written.append(out / "brain.nii.gz")
    return written
