"""The spec files this repository ships in ``specs/``, named one by one.

Tests read these and nothing else from that folder: ``monetdsl solve specs/NAME.monet``
(the README's first command) writes ``specs/NAME.schedule.monet`` beside its spec, and a
test that globbed the folder would take that schedule, or any file a user writes there,
for a spec.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["SPECS_DIR", "SHIPPED_SPEC_NAMES", "SHIPPED_SPEC_FILES"]

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"

SHIPPED_SPEC_NAMES = (
    "googlenet",
    "gpt2_small",
    "mobilenet_v2",
    "resblock",
    "resnet50",
    "small_cnn",
    "tiny_chain",
    "tiny_gpt",
    "transformer_block",
    "unet",
    "vgg16",
    "vgg16_no_segments",
)

SHIPPED_SPEC_FILES = tuple(SPECS_DIR / f"{name}.monet" for name in SHIPPED_SPEC_NAMES)
