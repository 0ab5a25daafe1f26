"""Reference models, 2D and 3D: classifiers, localizers and their checkpoints.

>>> from trustmap.models import create, list_architectures, load_checkpoint
>>> model = create("small_cnn", spatial_dims=2, in_channels=1, num_classes=2)
"""

from trustmap.models.architectures import SmallCNN, create, list_architectures
from trustmap.models.augment import AugmentConfig, augment
from trustmap.models.calibrate import measure_dataset_auc
from trustmap.models.checkpoint import load_checkpoint, save_checkpoint
from trustmap.models.localizers import BoxLocalizer, SegmentationLocalizer, is_localizer
from trustmap.models.training import (
    TrainConfig,
    TrainEvent,
    TrainResult,
    train_classifier,
    train_localizer,
)

__all__ = [
    "AugmentConfig",
    "BoxLocalizer",
    "SegmentationLocalizer",
    "SmallCNN",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "augment",
    "create",
    "is_localizer",
    "list_architectures",
    "load_checkpoint",
    "measure_dataset_auc",
    "save_checkpoint",
    "train_classifier",
    "train_localizer",
]
