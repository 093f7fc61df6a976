"""Do monetdsl.models' CNNs trace to the same spec as torchvision's? (they should: same layout)

torchvision is not a dependency. To run this check without touching the project's
environment, put torchvision's pure-Python model definitions on a side path (its compiled
ops need a matching torch build and are not used):

    pip install --target /tmp/tvlib --no-deps torchvision==0.28.0   # the release for torch 2.13
    PYTHONPATH=.:/tmp/tvlib python benchmarks/torchvision_equivalence.py

Result on 2026-11-25 (torch 2.13.0+cpu): ResNet-50, VGG-16, MobileNetV2 and GoogLeNet
(aux_logits=False) give byte-identical specs and parameter counts.
"""
import sys, difflib, torch
import os
import types

TV = os.environ.get("TORCHVISION_PATH", "/tmp/tvlib")
for pkgname, path in (("torchvision", TV + "/torchvision"), ("torchvision.models", TV + "/torchvision/models")):
    pkg = types.ModuleType(pkgname); pkg.__path__ = [path]; sys.modules[pkgname] = pkg  # skip package inits (compiled ops)
sys.modules["torchvision"].__version__ = "0.28.0 (model definitions only)"
import torchvision
import torchvision.models.resnet, torchvision.models.vgg, torchvision.models.mobilenetv2, torchvision.models.googlenet
R, V, M, G = (sys.modules[f"torchvision.models.{m}"] for m in ("resnet", "vgg", "mobilenetv2", "googlenet"))
class tvm:
    resnet50 = R.resnet50; vgg16 = V.vgg16
    mobilenet_v2 = M.mobilenet_v2; googlenet = G.googlenet
from monetdsl import models
from monetdsl.costs import trace_model
print("torchvision", torchvision.__version__)
pairs = {
  "resnet50": (tvm.resnet50(weights=None), models.resnet50(), (2,3,224,224)),
  "vgg16": (tvm.vgg16(weights=None), models.vgg16(), (2,3,224,224)),
  "mobilenet_v2": (tvm.mobilenet_v2(weights=None), models.mobilenet_v2(), (2,3,224,224)),
  "googlenet": (tvm.googlenet(weights=None, aux_logits=False, init_weights=False), models.googlenet(), (2,3,224,224)),
}
for name, (a, b, shape) in pairs.items():
    ta = trace_model(a, [shape], name=name).text(); tb = trace_model(b, [shape], name=name).text()
    na = sum(p.numel() for p in a.parameters()); nb = sum(p.numel() for p in b.parameters())
    diff = [l for l in difflib.unified_diff(ta.splitlines(), tb.splitlines(), lineterm="", n=0) if l.startswith(("+","-")) and not l.startswith(("+++","---"))]
    print(name, "params", na, nb, "identical spec" if ta == tb else f"{len(diff)} differing lines", diff[:6])
