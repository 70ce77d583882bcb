"""Small torch CNNs in plain torch, for compiling with graft (and for the pruning work).

- :func:`resnet_style`: ResNet basic blocks (He et al. 2016): conv/BN/ReLU stem, max pooling,
  residual adds with 1x1 conv/BN shortcuts where the shape changes, global average pooling,
  a linear head.
- :func:`mobilenetv3_style`: MobileNetV3 inverted residuals (Howard et al. 2019): 1x1
  expansion, depthwise kxk convolution, squeeze-excite (avg pool → 1x1 conv → ReLU → 1x1 conv
  → hardsigmoid, multiplied in), 1x1 projection, hardswish, a dropout classifier head.

Each factory returns ``(module, example_inputs)`` with the module in eval mode and
BatchNorm statistics randomized (seeded), so folding them changes real numbers::

    graft compile --torch examples.torch_models:resnet_style --input-shape 2x3x32x32 -o resnet.onnx
"""
from __future__ import annotations

import torch
from torch import nn


def _randomize_bn(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2d (no bias, 'same'-style padding k//2) followed by BatchNorm2d."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """x → conv3x3/BN/ReLU → conv3x3/BN, plus the shortcut (identity or 1x1 conv/BN), → ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3)
        self.relu = nn.ReLU()
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """Stem (conv/BN/ReLU, max pool 3x3/2) → BasicBlock stages → global avg pool → Linear."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks=(1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(conv1x1(relu(conv1x1(avgpool(x)))))."""

    def __init__(self, c: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, reduced, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand/BN/act → depthwise kxk/BN/act → [SE] → 1x1 project/BN (+ x when shapes match)."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool, hswish: bool):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        self.expand = nn.Sequential(conv_bn(cin, hidden, 1), act()) if hidden != cin else nn.Identity()
        self.depthwise = nn.Sequential(conv_bn(hidden, hidden, k, stride, groups=hidden), act())
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Style(nn.Module):
    """MobileNetV3-small-like: stem conv/BN/hardswish → inverted residuals → 1x1 conv → pool → head."""

    # (kernel, hidden, out, SE, hardswish, stride)
    CONFIG = ((3, 16, 16, True, False, 2), (3, 48, 24, False, False, 2), (3, 64, 24, False, False, 1),
              (5, 72, 40, True, True, 2), (5, 120, 40, True, True, 1))

    def __init__(self, num_classes: int = 10, last: int = 128):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.Hardswish())
        blocks, cin = [], 16
        for k, hidden, cout, se, hs, s in self.CONFIG:
            blocks.append(InvertedResidual(cin, hidden, cout, k, s, se, hs))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = nn.Sequential(conv_bn(cin, cin * 6, 1), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin * 6, last), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.head_conv(self.blocks(self.stem(x)))), 1))


def resnet_style(batch: int = 2, image: int = 32, num_classes: int = 10, seed: int = 0):
    """``(ResNetStyle in eval mode, (x,))`` with x float32 ``[batch, 3, image, image]``."""
    torch.manual_seed(seed)
    m = ResNetStyle(num_classes)
    _randomize_bn(m, seed)
    return m.eval(), (torch.randn(batch, 3, image, image),)


def mobilenetv3_style(batch: int = 2, image: int = 64, num_classes: int = 10, seed: int = 0):
    """``(MobileNetV3Style in eval mode, (x,))`` with x float32 ``[batch, 3, image, image]``."""
    torch.manual_seed(seed)
    m = MobileNetV3Style(num_classes)
    _randomize_bn(m, seed)
    return m.eval(), (torch.randn(batch, 3, image, image),)


MODELS = {"resnet_style": resnet_style, "mobilenetv3_style": mobilenetv3_style}
