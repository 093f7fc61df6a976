"""``monetdsl bench package.module:factory --input 8x3x64x64 --budget 60MiB``: train a few
steps with a schedule and measure them: peak memory against the plan and against eager
PyTorch, step time against eager (interleaved, medians)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..errors import Diagnostic, MonetError
from ..units import human_bytes
from .common import EXIT_OK, EXIT_USAGE, add_parser, check_output, cli_search_options, usage_error, write_after_work
from .trace import load_target, parse_input


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "bench",
        help="train with a schedule and measure memory and time",
        description="Build the model (TARGET is package.module:factory), plan a schedule for the inputs (under --budget"
        " or --max-overhead, or from --schedule), then run training steps: the measured peak memory of a step against"
        " the planned one and against eager PyTorch, and the step time against eager (interleaved, medians). A model"
        " that returns a tensor is trained on its sum; one that returns its loss, on the loss. Integer inputs are zeros.",
        examples=[
            "monetdsl bench monetdsl.models:small_cnn --input 64x3x32x32 --max-overhead 30%",
            "monetdsl bench monetdsl.models.bench:resnet18_like --input 8x3x64x64 --input 8:i64 --method recompute-all --json",
        ],
    )
    parser.add_argument("target", help="package.module:factory that returns the model")
    parser.add_argument("--input", action="append", required=True, metavar="SHAPE[:DTYPE]",
                        help="an input shape such as 64x3x32x32 (f32 unless :i64...); repeat for several inputs")
    parser.add_argument("--budget", help="peak memory of a step, fixed memory included, e.g. 200MiB")
    parser.add_argument("--max-overhead", help="compute overhead cap, e.g. 10%%")
    parser.add_argument("--schedule", help="a .monet schedule made for this model and these inputs")
    parser.add_argument("--method", default="auto", help="search method (default auto)")
    parser.add_argument("--optimizer", default="adam", help="optimizer state counted in fixed memory (default adam)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--probe", default="auto", help="memory probe: auto (what the allocator sees: cuda on a GPU, allocator on the CPU),"
                        " live, allocator (every byte through torch's CPU allocator) or cuda")
    costs = parser.add_mutually_exclusive_group()
    costs.add_argument("--profile", action="store_true",
                       help="solve on costs measured on this device (the default; every op and implementation, once per"
                       " op signature, kept in the cache directory)")
    costs.add_argument("--roofline", action="store_true",
                       help="solve on the roofline estimates of the device kind instead of measured costs")
    parser.add_argument("--cache-dir", help="keep solved schedules and measured costs here (default: the user's cache"
                        " directory, as monetdsl.optimize)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each (default 5)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="make glibc keep freed host memory in the process first (both runs: no page faults per step,"
                        " steadier times; see monetdsl.retain_freed_memory)")
    parser.add_argument("-o", "--output", help="write the schedule used (and its spec, NAME.spec.monet) here")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(run=run)


def _build(args):
    import torch

    factory = load_target(args.target)
    try:
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except Exception as exc:  # noqa: BLE001
        raise MonetError(Diagnostic(f"calling {args.target}() failed: {type(exc).__name__}: {exc}", args.target)) from None
    if not isinstance(model, torch.nn.Module):
        raise MonetError(Diagnostic(f"{args.target} returned {type(model).__name__}, not a torch.nn.Module", args.target))
    if args.device not in ("cpu", "cuda"):
        raise usage_error(f"--device {args.device}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise usage_error("--device cuda: no CUDA device is available here")
    inputs = []
    for shape, dtype in (parse_input(t) for t in args.input):
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=dtype, device=args.device))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype, device=args.device))
    return model.to(args.device).train(), tuple(inputs)


def run(args) -> int:
    from ..planning.schedule_cache import USER_CACHE
    from ..runtime import measure, optimize
    from ..search.solve import METHODS

    if args.repeats < 1:
        raise usage_error("--repeats must be at least 1")
    if args.probe not in ("auto", "live", "allocator", "cuda"):
        raise usage_error(f"--probe {args.probe}: use auto, live, allocator or cuda")
    malloc = "glibc defaults (or the platform's)"
    if args.retain_freed_memory:
        from ..runtime.host_malloc import retain_freed_memory

        malloc = retain_freed_memory().message
    checked = cli_search_options(args, methods=METHODS)
    outputs = _outputs(args.output)
    model, inputs = _build(args)
    optimized = optimize(model, inputs, budget=checked.memory_budget, max_overhead=args.max_overhead,
                         schedule=args.schedule, method=checked.method, optimizer=args.optimizer, profile=False if args.roofline else None,
                         cache_dir=USER_CACHE if args.cache_dir is None else args.cache_dir)
    plan = optimized.plan_for(*inputs)
    sim = plan.simulation
    probe = args.probe
    ours = measure(optimized, inputs, probe=probe, repeats=1)
    eager = measure(model, inputs, probe=probe, repeats=1)
    times = {"monetdsl": [], "eager": []}
    for _ in range(args.repeats + 1):  # interleaved; the first round warms up
        for name, module in (("monetdsl", optimized), ("eager", model)):
            times[name].append(_step_seconds(module, inputs, args.device))
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    data = {
        "network": plan.spec.network.name,
        "fingerprint": plan.spec.fingerprint,
        "costs": plan.trace.cost_model,
        "planned_peak_bytes": sim.peak_bytes,
        "planned_overhead": sim.overhead,
        "fixed_bytes": sim.fixed_bytes,
        "planned_activation_peak": ours.planned,
        "measured_activation_peak": ours.peak,
        "measured_over_planned": ours.ratio,
        "eager_activation_peak": eager.peak,
        "peak_vs_eager": ours.peak / eager.peak if eager.peak else None,
        "probe": ours.probe,
        "step_seconds": median["monetdsl"],
        "eager_step_seconds": median["eager"],
        "time_vs_eager": median["monetdsl"] / median["eager"],
        "malloc": malloc,
    }
    if outputs:
        from ..grammar import format_schedule, format_spec
        from ..ir import Schedule

        out, spec_path = outputs
        s = plan.schedule
        named = Schedule(spec_path.name, s.fingerprint, s.impls, s.forward_keep, s.stages)  # names the spec written beside it
        write_after_work(spec_path, format_spec(plan.spec), data, key="spec_output")
        write_after_work(out, format_schedule(named, plan.spec.network), data)
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{data['network']} (fingerprint {data['fingerprint']}), probe {ours.probe}; costs: {data['costs']}")
        print(f"  planned peak {human_bytes(sim.peak_bytes)} = fixed {human_bytes(sim.fixed_bytes)} + {human_bytes(ours.planned)};"
              f" planned compute x{1 + sim.overhead:.3f}")
        print(f"  measured peak above fixed: {human_bytes(ours.peak)} (measured/planned {ours.ratio:.4f}); eager"
              f" {human_bytes(eager.peak)} (x{data['peak_vs_eager']:.3f})")
        print(f"  step {median['monetdsl'] * 1e3:.1f} ms vs eager {median['eager'] * 1e3:.1f} ms (x{data['time_vs_eager']:.3f},"
              f" median of {args.repeats}, interleaved; malloc: {malloc})")
        if "output" in data and "spec_output" in data:
            print(f"wrote {data['output']} and {data['spec_output']}")
    return EXIT_USAGE if "output_error" in data or "spec_output_error" in data else EXIT_OK


def _outputs(output: str | None) -> tuple[Path, Path] | None:
    """The schedule's path and its spec's beside it (``plan.monet`` -> ``plan.spec.monet``),
    both checked before the work; two files need a folder, not a stream."""
    from ..io import is_stream

    if output is None:
        return None
    out = Path(output)
    if is_stream(out):
        raise usage_error(f"-o {output}: bench writes two files (the schedule and its spec beside it); give a file name")
    spec_path = out.with_name(out.name.replace(".monet", "") + ".spec.monet")
    check_output(out)
    check_output(spec_path)
    return out, spec_path


def _step_seconds(module, inputs, device: str) -> float:
    import torch

    for p in module.parameters():
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(*inputs)
    (out if out.dim() == 0 else out.sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start

