"""Data: medical image I/O, the dataset interface, loaders for real datasets, phantoms.

>>> from trustmap.data import open_dataset, rle_decode, read_rsna_boxes
>>> ds = open_dataset("cxr-pneumothorax")          # generated once into the cache  # doctest: +SKIP
>>> ds = open_dataset("/data/siim-acr")             # DICOMs + train-rle.csv        # doctest: +SKIP
"""

from trustmap.data.datasets import ImageDataset, Sample, TensorData, collate, open_dataset
from trustmap.data.io import WINDOW_PRESETS, LoadedImage, apply_window, load, save_map
from trustmap.data.labels import boxes_to_mask, read_rsna_boxes, rle_decode, rle_encode
from trustmap.data.loaders import (
    FolderDataset,
    MedMNISTDataset,
    NiftiPairsDataset,
    RSNADataset,
    SIIMDataset,
)

__all__ = [
    "WINDOW_PRESETS",
    "FolderDataset",
    "ImageDataset",
    "LoadedImage",
    "MedMNISTDataset",
    "NiftiPairsDataset",
    "RSNADataset",
    "SIIMDataset",
    "Sample",
    "TensorData",
    "apply_window",
    "boxes_to_mask",
    "collate",
    "load",
    "open_dataset",
    "read_rsna_boxes",
    "rle_decode",
    "rle_encode",
    "save_map",
]
