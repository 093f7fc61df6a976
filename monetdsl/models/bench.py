"""The benchmark models of ``torch-native.md``: a ResNet-18-like CNN and a GPT-2-like decoder,
each with its loss inside (``forward(inputs, targets) -> loss``), so a training step's whole
memory (logits and loss included) is planned and measured alike for every strategy.

Both also expose ``blocks()`` (the residual blocks, for per-block checkpointing) and
``as_sequential()`` (the same computation as ``nn.Sequential`` children, for
``checkpoint_sequential``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt2 import GPT2, GPTConfig

__all__ = ["ResNet18Like", "GPTLike", "resnet18_like", "gpt_like", "BasicBlock"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class _Head(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18Like(nn.Module):
    """ResNet-18 (2-2-2-2 basic blocks, 64-512 channels, batch norm) with cross-entropy."""

    def __init__(self, classes: int = 100):
        super().__init__()
        self.stem = _Stem()
        widths = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
        self.layers = nn.Sequential(*(BasicBlock(a, b, s) for a, b, s in widths))
        self.head = _Head(classes)

    def logits(self, x):
        return self.head(self.layers(self.stem(x)))

    def forward(self, x, target):
        return F.cross_entropy(self.logits(x), target)

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def as_sequential(self) -> nn.Sequential:
        return nn.Sequential(self.stem, *self.layers, self.head)


class _Embed(nn.Module):
    def __init__(self, gpt: GPT2):
        super().__init__()
        self.gpt = [gpt]  # not a submodule: the parameters stay the GPT's

    def forward(self, idx):
        g = self.gpt[0]
        pos = torch.arange(idx.shape[1], device=idx.device)
        return g.drop(g.wte(idx) + g.wpe(pos))


class _Final(nn.Module):
    def __init__(self, gpt: GPT2):
        super().__init__()
        self.gpt = [gpt]

    def forward(self, x):
        g = self.gpt[0]
        return g.lm_head(g.ln_f(x))


class GPTLike(nn.Module):
    """A GPT-2-like decoder (6 layers, width 384, 6 heads, vocabulary 8192, context 256)
    with cross-entropy over the next tokens."""

    def __init__(self, cfg: GPTConfig = GPTConfig(vocab=8192, context=256, layers=6, heads=6, width=384)):
        super().__init__()
        self.gpt = GPT2(cfg)

    def forward(self, idx, target):
        logits = self.gpt(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1))

    def blocks(self) -> list[nn.Module]:
        return list(self.gpt.h)

    def as_sequential(self) -> nn.Sequential:
        return nn.Sequential(_Embed(self.gpt), *self.gpt.h, _Final(self.gpt))


def resnet18_like() -> ResNet18Like:
    return ResNet18Like()


def gpt_like() -> GPTLike:
    return GPTLike()
