"""Regenerate the traced specs in specs/ (deterministic: same text on every run).

    python scripts/regenerate_specs.py            # write every shipped spec
    python scripts/regenerate_specs.py resnet50   # only some
    python scripts/regenerate_specs.py --check    # exit 1 if a file differs from a fresh trace

Models come from monetdsl.models (our definitions, with torchvision's module layout for
the CNNs), so the output does not depend on whether torchvision is installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from monetdsl import models  # noqa: E402
from monetdsl.models.shipped import SHIPPED  # noqa: E402
from monetdsl.costs import trace_model  # noqa: E402
from monetdsl.tracing import with_segments  # noqa: E402


def trace_text(entry) -> tuple[str, float]:
    torch.manual_seed(0)
    model = getattr(models, entry.factory)()
    inputs = [(shape, getattr(torch, dtype)) for shape, dtype in entry.inputs]
    start = time.perf_counter()
    result = trace_model(model, inputs, device=entry.device, optimizer=entry.optimizer, name=entry.name)
    if entry.segments:
        result = with_segments(result)
    return result.text(), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="specs to regenerate (default: all)")
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    parser.add_argument("--out", default=str(ROOT / "specs"), help="folder to write to")
    args = parser.parse_args(argv)
    wanted = [e for e in SHIPPED if not args.names or e.name in args.names]
    status = 0
    for entry in wanted:
        text, seconds = trace_text(entry)
        path = Path(args.out) / entry.filename
        if args.check:
            same = path.exists() and path.read_text() == text
            print(f"{entry.name}: {'up to date' if same else 'DIFFERS'} ({seconds:.1f} s)")
            status |= 0 if same else 1
        else:
            path.write_text(text)
            print(f"{entry.name}: wrote {path} ({len(text.splitlines())} lines, traced in {seconds:.1f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
