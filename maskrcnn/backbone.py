"""ResNet-FPN backbone from torchvision building blocks.

The module tree is torchvision's ``BackboneWithFPN`` (``body`` = the ResNet's ``conv1`` ..
``layer4``, ``fpn`` = ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``), so the state-dict keys
are those of ``maskrcnn_resnet50_fpn``'s ``backbone.*``. It returns P2..P5 as ``"0".."3"`` and
P6 as ``"pool"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn
from torchvision import models, ops
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .config import ModelConfig
from .sync_bn import SyncBatchNorm2d

RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
# Trainable layers counted from the top, as torchvision's ``trainable_backbone_layers``.
_LAYERS_FROM_TOP = ("layer4", "layer3", "layer2", "layer1", "conv1")


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's frozen BatchNorm (same buffers and state-dict keys) that computes in its
    input's dtype. torchvision's multiplies by float32 buffers, so under autocast every half
    precision convolution output is promoted back to float32 and the whole trunk runs in float32
    between convolutions. In float32 the arithmetic is torchvision's, operation for operation."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return x * scale.reshape(shape).to(x.dtype) + bias.reshape(shape).to(x.dtype)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer when the channel count is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def norm_layer(name: str) -> Callable[[int], nn.Module]:
    layers: dict[str, Callable[[int], nn.Module]] = {
        "frozen_bn": FrozenBatchNorm2d,
        "bn": nn.BatchNorm2d,
        "syncbn": SyncBatchNorm2d,
        "gn": group_norm,
    }
    return layers[name]


def stage_channels(backbone: str) -> list[int]:
    """Output channels of layer1..layer4: BasicBlock nets 64..512, Bottleneck nets 256..2048."""
    expansion = 1 if backbone in ("resnet18", "resnet34") else 4
    return [c * expansion for c in (64, 128, 256, 512)]


def freeze_layers(resnet: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` stages, as torchvision does."""
    train = list(_LAYERS_FROM_TOP[:trainable_layers])
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            param.requires_grad_(False)


def build_backbone(config: ModelConfig) -> BackboneWithFPN:
    """The ResNet-FPN of ``config`` with random weights (checkpoints load into it later)."""
    resnet = getattr(models, config.backbone)(weights=None, norm_layer=norm_layer(config.norm))
    freeze_layers(resnet, config.trainable_backbone_layers)
    return BackboneWithFPN(
        resnet,
        return_layers=RETURN_LAYERS,
        in_channels_list=stage_channels(config.backbone),
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
