"""Small models for CPU tests and examples: a CNN, a residual net and a U-Net-like net.

* :class:`SmallCNN`: conv-BN-ReLU-maxpool twice, dropout, linear (every CNN catalogue kind);
* :class:`TinyResNet`: a stem and two residual blocks (identity and projection skips);
* :class:`TinyUNet`: one down and one up level (transposed convolution) joined by a
  concatenation, with LeakyReLU activations;
* :class:`TinyMobile`: inverted residuals with in-place ReLU6 and a depthwise convolution;
* :func:`tiny_vgg`: VGG-style conv-ReLU blocks with max-pools, no batch norm: its first
  block holds the widest tensors and a small share of the compute, as in VGG-16 (the case
  for batch-sliced segments).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SmallCNN", "TinyResNet", "TinyUNet", "TinyMobile", "small_cnn", "tiny_resnet", "tiny_unet", "tiny_mobile",
           "tiny_vgg"]


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(2 * width * 8 * 8, classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.drop(torch.flatten(x, 1)))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.block1 = ResBlock(width, width)
        self.block2 = ResBlock(width, 2 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyUNet(nn.Module):
    def __init__(self, classes: int = 2, width: int = 8):
        super().__init__()
        conv = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))  # noqa: E731
        self.inc = conv(3, width)
        self.down = nn.Sequential(nn.MaxPool2d(2), conv(width, 2 * width))
        self.up = nn.ConvTranspose2d(2 * width, 2 * width, 2, stride=2)
        self.dec = conv(3 * width, width)
        self.outc = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        skip = self.inc(x)
        x = self.up(self.down(skip))
        return self.outc(self.dec(torch.cat([skip, x], dim=1)))


def small_cnn() -> SmallCNN:
    return SmallCNN()


def tiny_resnet() -> TinyResNet:
    return TinyResNet()


def tiny_unet() -> TinyUNet:
    return TinyUNet()


class TinyMobile(nn.Module):
    """MobileNetV2-style inverted residuals with in-place ReLU6 and depthwise convolutions."""

    def __init__(self, classes: int = 10, width: int = 8):
        super().__init__()

        def cba(cin, cout, k=1, groups=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*(layers + [nn.ReLU6(inplace=True)] if act else layers))

        self.stem = cba(3, width, 3)
        self.expand = cba(width, 4 * width)
        self.depthwise = cba(4 * width, 4 * width, 3, groups=4 * width)
        self.project = cba(4 * width, width, act=False)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.fc(x.mean((2, 3)))


def tiny_mobile() -> TinyMobile:
    return TinyMobile()


def tiny_vgg(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Three blocks for 3x32x32 images: 16 channels at 32x32 (two convolutions), then 48
    and 96 channels with eight convolutions each, a max-pool after each block, a linear
    classifier; seeded weights."""
    torch.manual_seed(0)
    layers, channels = [], 3
    for width, convs in ((16, 2), (48, 8), (96, 8)):
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(channels * 4 * 4, 10)]
    return nn.Sequential(*layers).to(dtype)
