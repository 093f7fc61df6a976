"""The shipped specs: which model, input, dtype, cost model and optimizer each one uses.

``scripts/regenerate_specs.py`` writes them; the slow tests check that tracing again gives
the same text. Specs are written as ``monetdsl trace`` writes them, with the widest blocks
of per-sample ops as batch-sliced segments (VGG-16's first block; no other shipped spec has
one that qualifies); ``vgg16_no_segments`` is VGG-16 op by op. MONeT's five CNNs use its setting (fp32, 224x224 except UNet at 416x608,
P100 roofline, plain SGD so fixed memory is parameters, gradients and input as in MONeT).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ShippedSpec", "SHIPPED"]


@dataclass(frozen=True)
class ShippedSpec:
    name: str
    factory: str  # attribute of monetdsl.models
    inputs: tuple  # ((shape), dtype name)
    device: str
    optimizer: str
    purpose: str
    #: the widest blocks of per-sample ops as batch-sliced segments, as ``monetdsl trace`` writes them
    segments: bool = True

    @property
    def filename(self) -> str:
        return f"{self.name}.monet"


SHIPPED = (
    ShippedSpec("resnet50", "resnet50", (((184, 3, 224, 224), "float32"),), "P100", "sgd", "MONeT: ResNet-50, batch 184"),
    ShippedSpec("googlenet", "googlenet", (((320, 3, 224, 224), "float32"),), "P100", "sgd", "MONeT: GoogLeNet, batch 320"),
    ShippedSpec("unet", "unet", (((11, 3, 416, 608), "float32"),), "P100", "sgd", "MONeT: UNet, batch 11 at 416x608"),
    ShippedSpec("mobilenet_v2", "mobilenet_v2", (((272, 3, 224, 224), "float32"),), "P100", "sgd", "MONeT: MobileNetV2, batch 272"),
    ShippedSpec("vgg16", "vgg16", (((176, 3, 224, 224), "float32"),), "P100", "sgd", "MONeT: VGG-16, batch 176"),
    ShippedSpec("vgg16_no_segments", "vgg16", (((176, 3, 224, 224), "float32"),), "P100", "sgd",
                "VGG-16 op by op (monetdsl trace --no-segments): PyTorch's own ops, the baseline", segments=False),
    ShippedSpec("gpt2_small", "gpt2_small", (((8, 1024), "int64"),), "A100", "adam", "GPT-2 small, batch 8, sequence 1024"),
    ShippedSpec("small_cnn", "small_cnn", (((64, 3, 32, 32), "float32"),), "cpu", "adam", "CPU-sized CNN for examples and tests"),
    ShippedSpec("tiny_gpt", "tiny_gpt", (((8, 64), "int64"),), "cpu", "adam", "CPU-sized two-block GPT for examples and tests"),
)
