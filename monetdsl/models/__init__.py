"""Model definitions for the shipped specs, tests and examples (plain ``torch.nn``).

The five CNNs of the MONeT paper follow torchvision's architectures and module names
(so specs name ops ``layer1.0.conv1`` exactly as a torchvision model would); when
torchvision is installed, :func:`get` returns torchvision's own model instead. UNet and
GPT-2 are our own definitions of the standard architectures. The small models are sized
for CPU tests and examples.

Every factory takes no required argument, so ``monetdsl trace monetdsl.models:resnet50``
works from the command line.
"""
from __future__ import annotations

import importlib.util

from .cnn import googlenet, mobilenet_v2, resnet50, vgg16
from .gpt2 import GPT2, GPTConfig, gpt2_small, tiny_gpt
from .small import SmallCNN, TinyMobile, TinyResNet, TinyUNet, small_cnn, tiny_mobile, tiny_resnet, tiny_unet, tiny_vgg
from .shipped import SHIPPED, ShippedSpec
from .unet import UNet, unet

__all__ = [
    "resnet50", "googlenet", "mobilenet_v2", "vgg16", "unet", "UNet", "gpt2_small", "tiny_gpt", "GPT2", "GPTConfig",
    "SHIPPED", "ShippedSpec", "small_cnn", "tiny_resnet", "tiny_unet", "tiny_mobile", "tiny_vgg", "SmallCNN", "TinyResNet", "TinyUNet", "TinyMobile", "get", "TORCHVISION",
]

def _has_torchvision() -> bool:
    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):  # a half-installed or stubbed torchvision
        return False


TORCHVISION = _has_torchvision()


def get(name: str, prefer_torchvision: bool = True):
    """A model by name; the CNNs come from torchvision when it is installed."""
    if prefer_torchvision and TORCHVISION and name in ("resnet50", "vgg16", "mobilenet_v2", "googlenet"):
        import torchvision.models as tvm

        if name == "googlenet":
            return tvm.googlenet(weights=None, aux_logits=False, init_weights=False)
        return getattr(tvm, name)(weights=None)
    return globals()[name]()
