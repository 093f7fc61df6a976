"""Forward steps written into the pass, each argument view made once, against steps called
one by one (each deriving its arguments' views itself), next to eager PyTorch.

For each model, the store-all plan with ``monetdsl.optimize``'s default options; its
straight-line code generated both ways (:func:`monetdsl.runtime.straight_line.generate`,
``inline=True`` / ``inline=False``: the same values, bit for bit), swapped in turn and
interleaved with eager's step in one process. A step is the model's forward and
``backward`` from a tensor of ones; forward and backward are timed apart, in process CPU
time (the step's own cost on a shared machine), the first round a warm-up; medians. For
the GRU also the cell as a plain PyTorch loop of the traced graph's out-of-place ops
(``plain loop``): what the unrolled ops cost without the runtime, against ``nn.GRU``'s
C++ cell.

    python benchmarks/forward_code.py [--models gru,decoder] [--rounds 40] [--output benchmarks/results/forward_code.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import monetdsl  # noqa: E402
from fidelity import MODELS  # noqa: E402
from monetdsl.io import atomic_write  # noqa: E402
from monetdsl.runtime.straight_line import generate  # noqa: E402


def _timed_step(module, x) -> tuple[float, float]:
    t0 = time.process_time()
    out = module(x)
    t1 = time.process_time()
    out.backward(torch.ones_like(out))
    return t1 - t0, time.process_time() - t1


class _PlainGRULoop(torch.nn.Module):
    """The GRU classifier's forward as a Python loop of out-of-place ops, on its weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        m, gru = self.model, self.model.gru
        x = m.emb(idx)
        width = gru.hidden_size
        steps = (torch.matmul(x, gru.weight_ih_l0.t()) + gru.bias_ih_l0).unbind(1)
        h = x.new_zeros(x.shape[0], width)
        for gates in steps:
            i_r, i_z, i_n = gates.split(width, 1)
            h_r, h_z, h_n = torch.addmm(gru.bias_hh_l0, h, gru.weight_hh_l0.t()).split(width, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (h - n) * z + n
        return m.fc(h)


def measure_model(name: str, rounds: int) -> dict:
    factory, batch = MODELS[name]
    torch.manual_seed(0)
    model, x = factory().train(), batch()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fast = monetdsl.optimize(model, x, method="store-all")
    plan = fast.plan_for(x)
    steps = plan.steps
    fixed = {n for n, t in plan.spec.network.tensors.items() if t.is_fixed}
    codes = {"inline": generate(steps, fixed), "called": generate(steps, fixed, inline=False)}
    others = {"eager": model, **({"plain loop": _PlainGRULoop(model)} if name == "gru" else {})}
    with torch.no_grad():
        for other in others.values():
            torch.testing.assert_close(other(x), model(x))  # the plain loop computes the model's forward
    samples = {k: [] for k in (*others, *codes)}
    for r in range(rounds + 1):
        for key in samples:
            if key in codes:
                steps.code = codes[key]
            sample = _timed_step(others.get(key, fast), x)
            if r:
                samples[key].append(sample)
    steps.code = codes["inline"]
    medians = {k: (statistics.median(f for f, _ in v), statistics.median(b for _, b in v)) for k, v in samples.items()}
    return {"model": name, "ops": len(steps.forward), "stretches": len(steps.stretches), **medians}


def table(rows: list[dict]) -> str:
    lines = ["| model | forward ops | eager fwd / bwd (ms) | plain loop fwd / bwd (ms) | called fwd / bwd (ms) | inline fwd / bwd (ms)"
             " | called step vs eager | inline step vs eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ms(key):
            if key not in r:
                return "—"
            f, b = r[key]
            return f"{f * 1e3:.2f} / {b * 1e3:.2f}"

        def ratio(key):
            return f"x{sum(r[key]) / sum(r['eager']):.2f}"

        lines.append(f"| {r['model']} | {r['ops']} | {ms('eager')} | {ms('plain loop')} | {ms('called')} | {ms('inline')} | {ratio('called')} | {ratio('inline')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gru,decoder")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure_model(name, args.rounds) for name in args.models.split(",")]
    text = table(rows)
    print(text)
    if args.output:
        command = "python benchmarks/forward_code.py " + " ".join(sys.argv[1:])
        atomic_write(args.output, f"# Forward steps inline, views made once\n\n{datetime.date.today()}, {platform.machine()} "
                     f"{os.cpu_count()} cores ({torch.get_num_threads()} threads), torch {torch.__version__}; load average"
                     f" {os.getloadavg()[0]:.1f} at the end; store-all plans, process CPU time, medians of"
                     f" {args.rounds} interleaved rounds; `{command}`\n\n" + text)


if __name__ == "__main__":
    main()
