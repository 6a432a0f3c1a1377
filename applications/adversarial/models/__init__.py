"""Image classifiers for adversarial training, and a factory that wraps them with normalization.

``build_model(name, num_classes, in_channels, mean, std)`` returns ``Normalized(net, mean, std)``:
a module that takes images in [0, 1].
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from applications.vision.small_cnn import SmallCNN

from .batchnorm import BatchNorm2d, batch_norm_train, use_lean_batchnorm
from .normalize import Normalized, Stats, as_channel_stats
from .preact_resnet import PreActBlock, PreActResNet, preact_resnet18
from .vit import VisionTransformer
from .wide_resnet import WideBasicBlock, WideResNet, WideStage, wide_resnet34_10

__all__ = [
    "BatchNorm2d",
    "MODELS",
    "MODEL_ALIASES",
    "Normalized",
    "PreActBlock",
    "PreActResNet",
    "SmallCNN",
    "VisionTransformer",
    "WideBasicBlock",
    "WideResNet",
    "WideStage",
    "as_channel_stats",
    "batch_norm_train",
    "build_model",
    "preact_resnet18",
    "use_lean_batchnorm",
    "wide_resnet34_10",
]


def _wide_resnet(num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    return WideResNet(num_classes=num_classes, in_channels=in_channels, **kwargs)


#: name -> constructor ``f(num_classes, in_channels, **kwargs)``.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": lambda num_classes, in_channels, **kw: preact_resnet18(num_classes, in_channels, **kw),
    "wide_resnet34_10": lambda num_classes, in_channels, **kw: wide_resnet34_10(
        num_classes, in_channels, **kw
    ),
    "wide_resnet": _wide_resnet,
    "small_cnn": lambda num_classes, in_channels, **kw: SmallCNN(num_classes, in_channels, **kw),
    "vit": lambda num_classes, in_channels, **kw: VisionTransformer(num_classes, in_channels, **kw),
}

#: short name -> name in :data:`MODELS`.
MODEL_ALIASES = {"prn18": "preact_resnet18", "wrn34_10": "wide_resnet34_10", "wrn": "wide_resnet", "cnn": "small_cnn"}


def build_model(
    name: str, num_classes: int, in_channels: int, mean: Stats, std: Stats, lean_batchnorm: bool = False, **kwargs: Any
) -> Normalized:
    """Builds the network ``name`` and wraps it in ``Normalized(net, mean, std)``.

    Names: ``preact_resnet18`` (alias ``prn18``), ``wide_resnet34_10`` (``wrn34_10``),
    ``wide_resnet`` (``wrn``; pass ``depth=``, ``widen_factor=``, ``dropout=``) and ``small_cnn``
    (``cnn``; ``width=``, ``hidden=``, ``pool_size=``) and ``vit`` (:class:`VisionTransformer`;
    ``image_size=`` (default 32: pass 28 for MNIST), ``patch_size=`` (4; 4 or 7 for MNIST), ``dim=``,
    ``depth=``, ``heads=``, ``mlp_ratio=``). Dashes and case are ignored
    (``PreAct-ResNet18`` works). ``lean_batchnorm=True`` swaps in :class:`BatchNorm2d` (a leaner second
    derivative for Fast-BAT's implicit gradient, see :mod:`.batchnorm`). Other keyword arguments go to the
    constructor.

    The returned module maps (B, in_channels, H, W) images in [0, 1] to logits (B, num_classes).
    Raises ValueError on an unknown name, listing the valid ones.
    """
    key = name.strip().lower().replace("-", "_")
    key = MODEL_ALIASES.get(key, key)
    if key not in MODELS:
        valid = ", ".join(sorted(MODELS)) + " (aliases: " + ", ".join(sorted(MODEL_ALIASES)) + ")"
        raise ValueError(f"unknown model {name!r}; valid names: {valid}")
    if not isinstance(lean_batchnorm, bool):
        raise ValueError(f"lean_batchnorm must be true or false, got {lean_batchnorm!r}")
    net = MODELS[key](num_classes, in_channels, **kwargs)
    if lean_batchnorm:
        use_lean_batchnorm(net)
    return Normalized(net, mean, std, channels=in_channels)
