"""A run's inputs built from its configuration: the data splits on the device and the network."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from applications.vision.data import DataError, ImageArrays, load_dataset, train_val_split

from .config import Config
from .models import build_model

__all__ = ["RunData", "build_run_model", "load_run_data"]


@dataclass
class RunData:
    """Train / validation / test splits (uint8, on the device) and what the model needs to know
    (``info``: num_classes, channels, image_size, mean, std, classes; stored in every checkpoint)."""

    train: ImageArrays
    val: Optional[ImageArrays]
    test: ImageArrays
    info: Dict[str, Any]


def load_run_data(cfg: Config, device: torch.device, need_train: bool = True) -> RunData:
    """Loads ``cfg.data``: the training split minus its last ``n_val`` images (validation), capped at
    ``n_train``, and the test split, all moved to ``device``.

    Raises:
        DataError: the data cannot be read (the message names the file).
        FileNotFoundError: the data path does not exist.
    """
    try:
        train_full, test = load_dataset(cfg.data.name, cfg.data.path)
    except DataError:
        raise
    except (ValueError, KeyError, EOFError, zlib.error) as err:  # the loaders' checks of shapes and labels
        raise DataError(f"dataset {cfg.data.name!r} ({cfg.data.path}): {err}") from err
    info = {"num_classes": train_full.num_classes, "channels": train_full.channels,
            "image_size": list(train_full.image_size), "mean": list(train_full.mean), "std": list(train_full.std),
            "classes": list(train_full.classes)}
    val = None
    train_split = train_full
    if need_train:
        if cfg.data.n_val > 0:
            train_split, val = train_val_split(train_full, cfg.data.n_val)
        if cfg.data.n_train is not None:
            train_split = train_split.subset(slice(0, min(cfg.data.n_train, len(train_split))))
        train_split = train_split.to(device)
        val = val.to(device) if val is not None else None
    return RunData(train=train_split, val=val, test=test.to(device), info=info)


def build_run_model(cfg: Config, info: Dict[str, Any]) -> nn.Module:
    """The configured network with its input normalization (``models.build_model``)."""
    return build_model(cfg.model.name, int(info["num_classes"]), int(info["channels"]), info["mean"], info["std"],
                       **cfg.model.options)
