"""Plans against the machine: planned memory and time next to what the device shows.

For each model and strategy, one training step (batch on the CPU, parameters' gradients
pre-allocated, the model's output seeded with a tensor of ones: the loss is the training
loop's) is measured three ways: the **planned** peak above fixed memory (the simulator's,
on the costs ``monetdsl.optimize`` solved on), the **live** peak (tensor bytes, the
memory model's own quantity) and the **allocator** peak (every byte through torch's CPU
allocator: library temporaries, fragmentation of nothing, the runtime's copies). Time:
every strategy's step interleaved with eager's in one process, ``--rounds`` rounds, the
median, as a ratio to eager's median, in process CPU time ("time vs eager": the step's
own cost, which the target is about) and in wall time ("wall vs eager": what the other
jobs of a shared machine add, too). Next to it the planned overhead (against the
runtime's store-all step, what the search sees) and the planned time against eager's:
that overhead times the runtime's store-all / eager ratio planning measured
(:mod:`monetdsl.runtime.eager_reference`; caps are met against eager's step).

Strategies, all with ``monetdsl.optimize``'s default options (costs measured on this
machine, method ``auto``) but ``--time-limit`` for the search:

* ``store-all``: every activation kept (``method="store-all"``);
* ``cap 10 %``, ``cap 15 %``: the lowest peak within that overhead of eager's step;
* ``checkpoint``: eager with ``torch.utils.checkpoint`` on every block (non-reentrant);
* ``at checkpoint's time``: the lowest peak within the overhead checkpoint measured.

A cap the runtime cannot keep against eager's step (its own store-all step is slower than
``1 + cap`` times eager's) trains the model as eager PyTorch; such a row says "eager: no
room" and has no planned figures (it is eager's step by construction).

Targets (``docs/runtime.md``): allocator / planned <= 1.05 for every schedule; measured
time <= (1 + cap) x eager x 1.10; ``at checkpoint's time`` below checkpoint's allocator
peak at no more time. Models: the repository's small zoo and bench models, and kinds it
does not hold, written here: a DenseNet-style CNN (concat growth, BN, max-pool,
dropout), a UNet-style CNN (transposed convolutions, skip concats, in-place ReLU), a small
pre-norm decoder (SDPA, GELU, LayerNorm, tied head), a depthwise-separable CNN and a GRU
classifier.

    python benchmarks/fidelity.py [--models densenet,unet,...] [--rounds 7] [--time-limit 15] [--output benchmarks/results/fidelity.md]

With ``--output``, the rows are also written as JSON beside the report (``fidelity.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monetdsl  # noqa: E402
from monetdsl.io import atomic_write  # noqa: E402
from monetdsl.models.bench import ResNet18Like  # noqa: E402
from monetdsl.models.small import SmallCNN, TinyMobile, TinyUNet  # noqa: E402
from monetdsl.runtime.eager_reference import eager_reference  # noqa: E402
from monetdsl.units import human_bytes  # noqa: E402


class Blocks(nn.Module):
    """A model as a stem, a list of blocks and a head, so ``torch.utils.checkpoint`` can wrap
    every block (``checkpointed = True``)."""

    checkpointed = False

    def run_blocks(self, h):
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return h


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, drop):
        super().__init__()
        self.bn, self.conv, self.drop = nn.BatchNorm2d(cin), nn.Conv2d(cin, growth, 3, padding=1, bias=False), nn.Dropout(drop)

    def forward(self, x):
        return torch.cat([x, self.drop(self.conv(F.relu(self.bn(x))))], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.bn, self.conv, self.pool = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1, bias=False), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.bn(x))))


class DenseNetStyle(Blocks):
    def __init__(self, growth=12, layers=4, classes=10, drop=0.1):
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * growth, 3, padding=1, bias=False)
        blocks, c = [], 2 * growth
        for stage in range(2):
            for _ in range(layers):
                blocks.append(DenseLayer(c, growth, drop))
                c += growth
            if stage == 0:
                blocks.append(Transition(c, c // 2))
                c //= 2
        self.blocks = nn.ModuleList(blocks)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x):
        h = self.run_blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetStyle(Blocks):
    def __init__(self, width=16, classes=3):
        super().__init__()
        w = width
        self.down1, self.down2, self.mid = ConvBNReLU(3, w), ConvBNReLU(w, 2 * w), ConvBNReLU(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), ConvBNReLU(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), ConvBNReLU(2 * w, w)
        self.out = nn.Conv2d(w, classes, 1)
        self.blocks = nn.ModuleList([self.down1, self.down2, self.mid, self.dec2, self.dec1])

    def _block(self, block, h):
        return checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)

    def forward(self, x):
        d1 = self._block(self.down1, x)
        d2 = self._block(self.down2, F.max_pool2d(d1, 2))
        m = self._block(self.mid, F.max_pool2d(d2, 2))
        u2 = self._block(self.dec2, torch.cat([self.up2(m), d2], 1))
        u1 = self._block(self.dec1, torch.cat([self.up1(u2), d1], 1))
        return self.out(u1)


class DecoderBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ln2, self.fc, self.out = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Decoder(Blocks):
    def __init__(self, vocab=2048, width=128, heads=4, layers=3, context=128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.run_blocks(h)))


class Separable(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.bn1 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.pw, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu6(self.bn2(self.pw(F.relu6(self.bn1(self.dw(x))))))


class DepthwiseCNN(Blocks):
    def __init__(self, c=32, layers=4, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(Separable(c) for _ in range(layers))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.run_blocks(self.stem(x)).mean((2, 3)))


class GRUClassifier(nn.Module):
    def __init__(self, vocab=1000, width=64, classes=10):
        super().__init__()
        self.emb, self.gru, self.fc = nn.Embedding(vocab, width), nn.GRU(width, width, batch_first=True), nn.Linear(width, classes)

    def forward(self, idx):
        out, _ = self.gru(self.emb(idx))
        return self.fc(out[:, -1])


def _image(n, size=32):
    return torch.randn(n, 3, size, size)


MODELS = {
    # name: (factory, batch factory)
    "densenet": (DenseNetStyle, lambda: _image(8)),
    "unet": (UNetStyle, lambda: _image(8)),
    "decoder": (Decoder, lambda: torch.randint(0, 2048, (8, 128))),
    "depthwise": (DepthwiseCNN, lambda: _image(8)),
    "gru": (GRUClassifier, lambda: torch.randint(0, 1000, (8, 32))),
    "small_cnn": (SmallCNN, lambda: _image(8)),
    "tiny_unet": (TinyUNet, lambda: _image(8)),
    "tiny_mobile": (TinyMobile, lambda: _image(8)),
    "resnet18_like": (lambda: _WithoutLoss(ResNet18Like()), lambda: _image(8, 64)),
}


class _WithoutLoss(nn.Module):
    """The bench model's body, returning class scores (the training loop's loss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.logits(x)


def _run(module, x):
    out = module(x)
    out.backward(torch.ones_like(out))


def _alloc_peak(module, x) -> int:
    return monetdsl.measure(module, x, probe="allocator", warmup=1).peak


def measure_model(name: str, rounds: int, time_limit: float) -> list[dict]:
    factory, batch = MODELS[name]
    torch.manual_seed(0)
    model, x = factory().train(), batch()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    eager_peak = _alloc_peak(model, x)
    rows, modules = [], {}
    started = time.perf_counter()
    strategies = [("store-all", {"method": "store-all"}), ("cap 10 %", {"max_overhead": 0.10}),
                  ("cap 15 %", {"max_overhead": 0.15})]
    for label, options in strategies:
        t0 = time.perf_counter()
        try:
            fast = monetdsl.optimize(model, x, time_limit=time_limit, **options)
        except monetdsl.MonetError as exc:
            rows.append({"model": name, "strategy": label, "error": str(exc).splitlines()[0][:100]})
            continue
        plan = fast.plan_for(x)
        modules[label] = fast
        rows.append({"model": name, "strategy": label, "cap": options.get("max_overhead", 0.0), **_planned(model, x, plan),
                     "live": monetdsl.measure(fast, x, probe="live").peak, "allocator": _alloc_peak(fast, x),
                     "plan_seconds": time.perf_counter() - t0})
    blocked = isinstance(model, Blocks)
    if blocked:
        model.checkpointed = True
        rows.append({"model": name, "strategy": "checkpoint", "allocator": _alloc_peak(model, x)})
        model.checkpointed = False
    times = _interleaved(model, x, modules, rounds, checkpointed=blocked)
    for row in rows:
        key = row["strategy"]
        if key in times:
            row["time_vs_eager"], row["wall_vs_eager"] = _ratios(times, key)
        row["vs_eager_peak"] = row["allocator"] / eager_peak if "allocator" in row else None
    if blocked:
        check = next(r for r in rows if r["strategy"] == "checkpoint")
        cap = max(check["time_vs_eager"] - 1, 0.0)
        try:
            fast = monetdsl.optimize(model, x, time_limit=time_limit, max_overhead=cap)
            plan = fast.plan_for(x)
            t = _interleaved(model, x, {"at checkpoint's time": fast}, rounds, checkpointed=True)
            cpu, wall = _ratios(t, "at checkpoint's time")
            rows.append({"model": name, "strategy": "at checkpoint's time", "cap": cap, **_planned(model, x, plan),
                         "live": monetdsl.measure(fast, x, probe="live").peak,
                         "allocator": _alloc_peak(fast, x), "time_vs_eager": cpu, "wall_vs_eager": wall,
                         "checkpoint_time_vs_eager": _ratios(t, "checkpoint")[0],
                         "vs_eager_peak": _alloc_peak(fast, x) / eager_peak, "vs_checkpoint_peak": None})
            rows[-1]["vs_checkpoint_peak"] = rows[-1]["allocator"] / check["allocator"]
        except monetdsl.MonetError as exc:
            rows.append({"model": name, "strategy": "at checkpoint's time", "error": str(exc).splitlines()[0][:100]})
    print(f"{name}: eager allocator peak {human_bytes(eager_peak)}; {time.perf_counter() - started:.0f} s", flush=True)
    for row in rows:
        row["eager_peak"] = eager_peak
    return rows


def _interleaved(model, x, modules: dict, rounds: int, checkpointed: bool) -> dict:
    """Median step seconds of eager, checkpoint (when ``checkpointed``) and each module,
    interleaved, the first round a warm-up: ``{key: (process CPU time, wall time)}``. On a
    machine other jobs share, CPU time is the step's own cost; wall time adds whatever
    the other jobs took from it."""
    samples: dict[str, list] = {"eager": [], **({"checkpoint": []} if checkpointed else {}), **{k: [] for k in modules}}
    for r in range(rounds + 1):
        for key in samples:
            module = modules.get(key, model)
            if checkpointed:
                model.checkpointed = key == "checkpoint"
            cpu, wall = time.process_time(), time.perf_counter()
            _run(module, x)
            if r:
                samples[key].append((time.process_time() - cpu, time.perf_counter() - wall))
    if checkpointed:
        model.checkpointed = False
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in samples.items()}


def _ratios(times: dict, key: str) -> tuple[float, float]:
    """``key``'s CPU and wall times as multiples of eager's."""
    return times[key][0] / times["eager"][0], times[key][1] / times["eager"][1]


def _planned(model, x, plan) -> dict:
    """The plan's own figures; a plan that trains as eager PyTorch (no schedule fits the cap
    against eager's step) has none: it is eager's step, by construction."""
    if plan.runs_eager:
        return {"runs_eager": True, "planned_vs_eager": 1.0}
    return {"planned": plan.planned_activation_peak, "planned_overhead": plan.simulation.overhead,
            "planned_vs_eager": (1 + plan.simulation.overhead) * _runtime_over_eager(model, x, plan)}


def _runtime_over_eager(model, x, plan) -> float:
    """The runtime's fastest step over eager's, as planning measured it (measured now when
    the plan needed none: store-all plans)."""
    return eager_reference(model, [x], plan.trace, plan.spec, optimizer="adam").runtime_over_eager


def _fmt(value, kind):
    if value is None:
        return "—"
    return {"bytes": human_bytes, "ratio": lambda v: f"{v:.3f}", "x": lambda v: f"x{v:.2f}", "pct": lambda v: f"{v:.1%}"}[kind](value)


def table(rows: list[dict]) -> str:
    head = ("| model | strategy | planned | live | allocator | alloc/plan | planned overhead | planned vs eager | time vs eager |"
            " wall vs eager | target time | peak vs eager | vs checkpoint |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['error']} |||||||||||")
            continue
        ratio = r["allocator"] / r["planned"] if r.get("planned") else None
        target = (1 + r["cap"]) * 1.10 if "cap" in r else None
        lines.append("| " + " | ".join([
            r["model"], r["strategy"] + (" (eager: no room)" if r.get("runs_eager") else ""), _fmt(r.get("planned"), "bytes"), _fmt(r.get("live"), "bytes"), _fmt(r.get("allocator"), "bytes"),
            _fmt(ratio, "ratio"), _fmt(r.get("planned_overhead"), "pct"), _fmt(r.get("planned_vs_eager"), "x"),
            _fmt(r.get("time_vs_eager"), "x"), _fmt(r.get("wall_vs_eager"), "x"), _fmt(target, "x"), _fmt(r.get("vs_eager_peak"), "ratio"), _fmt(r.get("vs_checkpoint_peak"), "ratio")]) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="densenet,unet,decoder,depthwise,gru,small_cnn,tiny_unet,tiny_mobile")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--time-limit", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, 2-thread kernels wait on each other's"
                        " preempted thread and step times say more about the load than about the plan)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="make glibc keep freed host memory first (monetdsl.retain_freed_memory): no page faults per step")
    parser.add_argument("--output", default=None, help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = monetdsl.retain_freed_memory().message if args.retain_freed_memory else "glibc defaults"
    rows = []
    for name in args.models.split(","):
        try:
            rows.extend(measure_model(name, args.rounds, args.time_limit))
        except Exception as exc:  # noqa: BLE001 - a model that cannot be planned is a row, not the end of the run
            rows.append({"model": name, "strategy": "all", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
    text = table(rows)
    print(text)
    if args.output:
        command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:])
        report = (f"# Plans against the machine\n\n{datetime.date.today()}, {platform.machine()} "
                  f"{os.cpu_count()} cores ({torch.get_num_threads()} threads), torch {torch.__version__}, malloc: {malloc};"
                  f" load average {os.getloadavg()[0]:.1f} at the end; `{command}`\n\n"
                  + text)
        atomic_write(args.output, report)
        facts = {"date": str(datetime.date.today()), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": malloc,
                 "load_average_at_end": round(os.getloadavg()[0], 2), "command": command, "rows": rows}
        atomic_write(Path(args.output).with_suffix(".json"), json.dumps(facts, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
