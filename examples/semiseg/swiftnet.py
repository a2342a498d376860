"""SwiftNet-RN18 / SwiftNet-RN34: a compact reimplementation of the single-scale SwiftNet
(Oršić et al., CVPR 2019) used in the paper.

    ResNet encoder (torchvision, ``weights=None``) -> SPP on the stride-32 features ->
    upsampling ladder (3 blocks: 1x1 skip bottleneck + add + 3x3 blend, BN-ReLU-Conv) ->
    stride-4 logits (BN-ReLU-1x1 conv) -> bilinear upsampling to the input size.

Inputs are RGB images in ``[0, 1]``; the ImageNet normalisation is part of the model (so
perturbations such as PhTPS work on ``[0, 1]`` images). ImageNet weights are read from a
local file only (``pretrained="resnet18.pth"``, loaded with ``weights_only=True``); nothing
is downloaded.

``model(x)`` returns logits at the input resolution, ``model(x, upsample=False)`` (or
``model.forward_low(x)``) the stride-4 logits, for losses that upsample on the fly.
Shared by the trainer (``examples/semiseg/train.py``) and the memory benchmark.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENCODERS = {"rn18": "resnet18", "rn34": "resnet34", "resnet18": "resnet18", "resnet34": "resnet34"}


class BNReLUConv(nn.Sequential):
    """SwiftNet's pre-activation unit: BatchNorm -> ReLU -> Conv."""

    def __init__(self, cin: int, cout: int, k: int = 3, bias: bool = False):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=False))
        self.add_module("conv", nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias))


class SpatialPyramidPooling(nn.Module):
    """SPP with a grid that follows the aspect ratio of the features (SwiftNet's default)."""

    def __init__(self, cin: int, bottleneck: int = 128, level_size: int = 32, out: int = 128,
                 grids: Sequence[int] = (8, 4, 2, 1), square_grid: bool = False):
        super().__init__()
        self.grids = tuple(grids)
        self.square_grid = square_grid
        self.bottleneck = BNReLUConv(cin, bottleneck, k=1)
        self.levels = nn.ModuleList(BNReLUConv(bottleneck, level_size, k=1) for _ in self.grids)
        self.fuse = BNReLUConv(bottleneck + level_size * len(self.grids), out, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ar = w / h
        x = self.bottleneck(x)
        out = [x]
        for g, conv in zip(self.grids, self.levels):
            size = (g, g) if self.square_grid else (g, max(1, round(ar * g)))
            y = conv(F.adaptive_avg_pool2d(x, size))
            out.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(out, 1))


class UpsampleBlock(nn.Module):
    """Ladder step: upsample the coarse features to the skip's size, add the 1x1-projected
    skip, blend with a 3x3 BN-ReLU-Conv."""

    def __init__(self, channels: int, skip_channels: int, k: int = 3):
        super().__init__()
        self.skip = BNReLUConv(skip_channels, channels, k=1)
        self.blend = BNReLUConv(channels, channels, k=k)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = self.skip(skip)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.blend(x + skip)


def _resnet(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def load_imagenet_weights(encoder: nn.Module, path: str) -> None:
    """Load a torchvision-style ResNet state dict (``resnet18-f37072fd.pth`` or a checkpoint
    holding one under ``state_dict``/``model``) from a local file, ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SwiftNet: ImageNet weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, non-tensor content
        raise RuntimeError(f"SwiftNet: cannot load ImageNet weights from {path} with weights_only=True: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RuntimeError(f"SwiftNet: {path} does not hold a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.startswith("fc."))
    bad = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or bad:
        raise RuntimeError(f"SwiftNet: {path} does not match the encoder "
                           f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, wrong shapes {bad[:5]}); "
                           "is it the right ResNet depth?")
    encoder.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


class SwiftNet(nn.Module):
    """SwiftNet with a ResNet-18/34 encoder.

    Args:
        num_classes: output classes (19 for Cityscapes).
        encoder: ``"rn18"`` or ``"rn34"``.
        pretrained: path of a local ImageNet ResNet state dict, or ``None`` (random init).
        features: decoder width (128 in SwiftNet).
        spp_grids: SPP pooling grids.
    """

    output_stride = 4

    def __init__(self, num_classes: int = 19, encoder: str = "rn18", pretrained: Optional[str] = None,
                 features: int = 128, spp_grids: Sequence[int] = (8, 4, 2, 1)):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"SwiftNet: unknown encoder {encoder!r}; choose from {sorted(ENCODERS)}")
        net = _resnet(ENCODERS[encoder])
        if pretrained:
            load_imagenet_weights(net, pretrained)
        self.encoder_name = ENCODERS[encoder]
        self.num_classes = num_classes
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        chans = [m[-1].conv2.out_channels for m in (self.layer1, self.layer2, self.layer3, self.layer4)]
        self.spp = SpatialPyramidPooling(chans[3], bottleneck=features, level_size=features // len(spp_grids),
                                         out=features, grids=spp_grids)
        # coarse to fine: skips from layer3 (s16), layer2 (s8), layer1 (s4)
        self.upsample = nn.ModuleList(UpsampleBlock(features, c) for c in reversed(chans[:3]))
        self.logits = BNReLUConv(features, num_classes, k=1, bias=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encoder_parameters(self):
        """The ResNet parameters (the pretrained part: lower learning rate and weight decay)."""
        for m in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            yield from m.parameters()

    def decoder_parameters(self):
        """SPP, ladder and logits (always randomly initialised)."""
        for m in (self.spp, self.upsample, self.logits):
            yield from m.parameters()

    def forward_low(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-4 logits ``(B, C, ceil(H/4), ceil(W/4))`` of RGB ``x`` in ``[0, 1]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SwiftNet: expected images (B, 3, H, W), got {tuple(x.shape)}")
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.stem(x)
        s4 = self.layer1(x)
        s8 = self.layer2(s4)
        s16 = self.layer3(s8)
        y = self.spp(self.layer4(s16))
        for block, skip in zip(self.upsample, (s16, s8, s4)):
            y = block(y, skip)
        return self.logits(y)

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        """Logits at the input resolution (``upsample=False``: the stride-4 logits)."""
        low = self.forward_low(x)
        if not upsample:
            return low
        return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)


def swiftnet_rn18(num_classes: int = 19, pretrained: Optional[str] = None, **kw) -> SwiftNet:
    return SwiftNet(num_classes, "rn18", pretrained, **kw)


def swiftnet_rn34(num_classes: int = 19, pretrained: Optional[str] = None, **kw) -> SwiftNet:
    return SwiftNet(num_classes, "rn34", pretrained, **kw)


def build_swiftnet(arch: str = "swiftnet_rn18", num_classes: int = 19, pretrained: Optional[str] = None) -> SwiftNet:
    """``arch`` in ``swiftnet_rn18``/``swiftnet_rn34`` (or ``rn18``/``rn34``)."""
    enc = arch.lower().replace("swiftnet_", "").replace("swiftnet-", "")
    return SwiftNet(num_classes, enc, pretrained)
