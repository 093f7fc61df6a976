"""``monetdsl trace package.module:factory --input 184x3x224x224 -o spec.monet``."""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path

from ..errors import Diagnostic, MonetError
from .common import EXIT_OK, EXIT_USAGE, add_parser, check_output, usage_error, write_after_work


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "trace",
        help="trace a PyTorch model into a spec",
        description="Capture one training step of a model (forward, loss, backward) on fake tensors and write"
        " it as a .monet spec: every op with its implementations, what each backward reads, costs and fixed"
        " memory. TARGET is package.module:factory (a function or class called with no arguments).",
        examples=[
            "monetdsl trace monetdsl.models:resnet50 --input 184x3x224x224 -o resnet50.monet",
            "monetdsl trace monetdsl.models:gpt2_small --input 8x1024:i64 --device A100 --optimizer adam -o gpt2.monet",
            "monetdsl trace monetdsl.models:small_cnn --input 64x3x32x32 --device cpu --profile -o small.monet",
        ],
    )
    parser.add_argument("target", help="package.module:factory that returns the model")
    parser.add_argument("--input", action="append", required=True, metavar="SHAPE[:DTYPE]",
                        help="an input shape such as 184x3x224x224 (dtype f32 unless :i64, :bf16...); repeat for several inputs")
    parser.add_argument("--dtype", help="cast the model and floating inputs to f32, f16, bf16 or f64")
    parser.add_argument("--device", default="P100", help="cost model: a roofline preset (cpu, P100, V100, A100, H100), or"
                        " with --profile the device to time on (cpu, cuda). Default P100")
    parser.add_argument("--profile", action="store_true", help="time every op and implementation on --device")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op with --profile (median; default 5)")
    parser.add_argument("--optimizer", default="adam", help="optimizer state in fixed memory: adam, adamw, momentum or sgd (default adam)")
    parser.add_argument("--loss", default="auto", help="auto (cross-entropy for class scores), cross_entropy, mse, sum,"
                        " none (the model returns the loss), or output (the training loop computes the loss: the spec"
                        " ends at the model's output, as monetdsl.optimize traces it); or package.module:function"
                        " taking the model's output")
    parser.add_argument("--name", help="network name (default: from the model's class)")
    parser.add_argument("--no-segments", action="store_true", help="write every op on its own; by default the widest"
                        " blocks of per-sample ops (convolutions, activations, pooling) whose recomputation fits in"
                        " 10%% of the step become batch-sliced segments (docs/search.md)")
    parser.add_argument("-o", "--output", help="where to write the spec (default: stdout); a different file already"
                        " there is kept as NAME.bak")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (summary, or errors)")
    parser.set_defaults(run=run)


_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i64": "int64", "i32": "int32",
           "u8": "uint8", "bool": "bool"}


def parse_input(text: str):
    """``184x3x224x224`` -> ((184, 3, 224, 224), torch.float32); ``8x1024:i64`` -> int64."""
    import torch

    shape_text, _, dtype_text = text.partition(":")
    if not re.fullmatch(r"\d+(x\d+)*", shape_text.strip()):
        raise usage_error(f"--input {text}: write a shape as dimensions joined by x, e.g. 184x3x224x224 or 8x1024:i64")
    dtype_text = dtype_text.strip() or "f32"
    if dtype_text not in _DTYPES:
        raise usage_error(f"--input {text}: unknown dtype {dtype_text}; use one of {', '.join(_DTYPES)}")
    return tuple(int(d) for d in shape_text.split("x")), getattr(torch, _DTYPES[dtype_text])


def load_target(target: str):
    """Import ``package.module:attribute`` and return the attribute."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise usage_error(f"{target}: write the target as package.module:factory")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        folder, _, file = module_name.rpartition(os.sep if os.sep in module_name else "/")
        raise usage_error(f"{target}: the target is a module name, not a file: run from {folder or '.'} (or put it on"
                          f" PYTHONPATH) and write {file.removesuffix('.py')}:{attr}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise MonetError(Diagnostic(f"cannot import {module_name}: {type(exc).__name__}: {exc}", target)) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MonetError(Diagnostic(f"{module_name} has no attribute {attr}", target))
        obj = getattr(obj, part)
    return obj


def run(args) -> int:
    import torch.nn as nn

    from ..costs import trace_model
    from ..tracing import with_segments

    inputs = [parse_input(t) for t in args.input]
    if args.output:
        check_output(args.output, stdout_is_json=getattr(args, "json", False))
    factory = load_target(args.target)
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:  # noqa: BLE001
        raise MonetError(Diagnostic(f"calling {args.target}() failed: {type(exc).__name__}: {exc}", args.target)) from None
    if not isinstance(model, nn.Module):
        raise MonetError(Diagnostic(f"{args.target} returned {type(model).__name__}, not a torch.nn.Module", args.target))
    loss = args.loss if ":" not in args.loss else load_target(args.loss)
    name = args.name
    if name is None and callable(factory) and not isinstance(factory, type):
        name = getattr(factory, "__name__", None)  # monetdsl.models:small_cnn -> small_cnn
    result = trace_model(model, inputs, loss=loss, name=name, device=args.device, profile=args.profile,
                         optimizer=args.optimizer, dtype=args.dtype, repeats=args.repeats)
    if not args.no_segments:
        result = with_segments(result)
    text = result.text()
    net = result.network
    summary = {
        "ok": True, "network": net.name, "forward_ops": len(net.forward_ops), "backward_ops": len(net.backward_ops),
        "tensors": len(net.tensors), "fixed_bytes": net.fixed_bytes, "cost_model": result.cost_model,
        "capture_seconds": round(result.capture_seconds, 3), "seconds": round(result.total_seconds, 3),
        "notes": result.built.notes,
    }
    if args.output:
        write_after_work(args.output, text, summary)
    if args.json:
        print(json.dumps(summary))
    elif "output" in summary:
        print(f"wrote {args.output}: network {net.name}, {len(net.forward_ops)} forward ops, {len(net.backward_ops)}"
              f" backward ops ({result.total_seconds:.1f} s)")
        for note in result.built.notes:
            print(f"note: {note}", file=sys.stderr)
    else:  # no -o, or it could not be written: the spec is not lost
        sys.stdout.write(text)
    return EXIT_USAGE if "output_error" in summary else EXIT_OK
