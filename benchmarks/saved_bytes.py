"""Does each shipped model's spec keep what autograd keeps? (bytes, per op and in total)

    python benchmarks/saved_bytes.py [--batch 2]

Traces every shipped model at a small batch (the description does not depend on the
batch size; a real eager step of ResNet-50 at batch 184 would need ~15 GB), runs one real
eager forward with ``saved_tensors_hooks`` and compares. Dropout is routed to
``torch.native_dropout`` in the eager run (the fused kernel GPUs and the trace use; CPU
eager dropout keeps a float mask instead).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from monetdsl import models  # noqa: E402
from monetdsl.models.shipped import SHIPPED  # noqa: E402
from monetdsl.costs import trace_model  # noqa: E402
from monetdsl.tracing.evidence import autograd_saved, spec_saved  # noqa: E402

SMALL = {"unet": (1, 3, 208, 304), "gpt2_small": (1, 128), "tiny_gpt": (2, 64)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("names", nargs="*")
    args = parser.parse_args(argv)
    F.dropout = lambda x, p=0.5, training=True, inplace=False: torch.native_dropout(x, p, training)[0] if training else x
    print(f"{'model':<14} {'input':<18} {'ops':>5} {'autograd MiB':>13} {'spec MiB':>10} {'per-op equal':>13} {'s':>6}")
    for entry in SHIPPED:
        if args.names and entry.name not in args.names:
            continue
        torch.manual_seed(0)
        model = getattr(models, entry.factory)()
        (shape, dtype), = entry.inputs
        shape = SMALL.get(entry.name, (args.batch,) + tuple(shape[1:]))
        if dtype == "int64":
            x = torch.randint(0, model.cfg.vocab, shape)
        else:
            x = torch.randn(shape)
        start = time.perf_counter()
        result = trace_model(model, [x], device=entry.device)
        real = autograd_saved(model, [x])
        spec = spec_saved(result.network)
        equal = [a[1] for a in real.per_op] == [b[1] for b in spec.per_op]
        print(f"{entry.name:<14} {'x'.join(map(str, shape)):<18} {len(spec.per_op):>5} {real.total / 2**20:>13.3f}"
              f" {spec.total / 2**20:>10.3f} {str(equal) + ('' if real.total == spec.total else ' (total differs)'):>13}"
              f" {time.perf_counter() - start:>6.1f}")


if __name__ == "__main__":
    main()
