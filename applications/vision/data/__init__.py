"""Datasets as uint8 tensors, loaded once onto the device, augmented there a whole batch at a time.

* :mod:`.arrays`: :class:`ImageArrays` (one split: uint8 images, labels, class names, the per-channel
  mean / std for the model's ``Normalized`` wrapper) and :func:`train_val_split` (the official protocol:
  the *last* ``n_val`` training images validate).
* :mod:`.embedded`, :mod:`.image_folder`, :mod:`.files`: loaders returning ``(train, test)``;
  :func:`load_dataset` (:mod:`.sources`) is the front door, by name.
* :mod:`.augment` and :mod:`.loader`: batched augmentation and :class:`DeviceLoader`, the batches the
  trainer trains on.
"""

from .arrays import DATASET_STATS, ImageArrays, channel_stats, train_val_split, with_stats
from .augment import Augment, crop_flip, rotate
from .embedded import load_digits, load_mnist5k
from .errors import DataError
from .files import load_npz, load_torchvision
from .image_folder import default_cache_dir, is_image_folder, load_image_folder
from .loader import DeviceLoader
from .sources import DATASETS, PATH_MUST_EXIST, PATH_REQUIRED, load_dataset

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "PATH_MUST_EXIST",
    "PATH_REQUIRED",
    "Augment",
    "DataError",
    "DeviceLoader",
    "ImageArrays",
    "channel_stats",
    "crop_flip",
    "default_cache_dir",
    "is_image_folder",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist5k",
    "load_npz",
    "load_torchvision",
    "rotate",
    "train_val_split",
    "with_stats",
]
