"""The simulator against hand computations, and its refusal of illegal schedules.

Hand computations use these sizes:
* tiny_chain: A = one activation (1024x512 f32 = 2 MiB), M = a 1-bit mask (64 KiB),
  W = one weight (1 MiB), F = fixed memory (x + 3 weights + 3 MiB grads + 6 MiB Adam = 14 MiB).
* resblock: A = 32x64x56x56 f32, S = bn statistics (512 B), K = conv workspace (8 MiB),
  C = a conv weight (147456 B), F = fixed memory.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from monetdsl.grammar import load_spec, parse_schedule, parse_spec
from monetdsl.search import simulate, solve
from monetdsl.validate import resolve_constraints

SPECS = Path(__file__).resolve().parent.parent / "specs"
MiB = 1 << 20

# tiny_chain sizes
A = 1024 * 512 * 4
M = 1024 * 512 // 8
W = 512 * 512 * 4
F = A + 3 * W + 3 * MiB + 6 * MiB


def schedule_for(spec, body: str):
    return parse_schedule(f'schedule for "{spec.path}" fingerprint {spec.fingerprint}\n' + body, "<hand>")


def run(spec, body: str, **kw):
    return simulate(spec.network, schedule_for(spec, body), fingerprint=spec.fingerprint, **kw)


@pytest.fixture(scope="module")
def tiny():
    return load_spec(SPECS / "tiny_chain.monet")


@pytest.fixture(scope="module")
def resblock():
    return load_spec(SPECS / "resblock.monet")


def test_fixed_memory_is_what_the_spec_declares(tiny, resblock):
    assert tiny.network.fixed_bytes == F
    assert resblock.network.fixed_bytes == 32 * 64 * 56 * 56 * 4 + 2 * 147456 + 4 * 256 + 288 * 1024 + 576 * 1024


def test_tiny_chain_store_all_by_hand(tiny):
    result = run(
        tiny,
        """
  impl relu1 = plain
  impl relu1.backward = from_output
  impl relu2 = plain
  impl relu2.backward = from_output
  forward
    keep a1, a2, h3
  stage loss.backward
    free h3
  stage fc3.wgrad
  stage fc3.dgrad
  stage relu2.backward
    free a2
  stage fc2.wgrad
  stage fc2.dgrad
  stage relu1.backward
    free a1
  stage fc1.wgrad
""",
    )
    assert result.valid, [e.format() for e in result.errors]
    # step by step: fc1, relu1, fc2, relu2, fc3, loss, then the eight backward ops
    expected = [
        F + A,
        F + 2 * A,
        F + 2 * A,
        F + 3 * A,
        F + 3 * A,
        F + 3 * A + 4,
        F + 4 * A + 8,  # loss.backward: a1, a2, h3, l, seed grad(l), new grad(h3)
        F + 3 * A + 8 + W,  # fc3.wgrad: the weight gradient is a temporary (the seed is held to the end)
        F + 4 * A + 8,
        F + 4 * A + 8,
        F + 2 * A + 8 + W,
        F + 3 * A + 8,
        F + 3 * A + 8,
        F + A + 8 + W,
    ]
    assert [s.peak for s in result.steps] == expected
    assert result.peak_bytes == F + 4 * A + 8
    assert result.peak_step.op == "loss.backward"
    assert result.compute_us == 2500.0 and result.overhead == 0.0
    assert result.steps[-1].live_after == 8  # only the loss value and its gradient (the caller's seed) are left


def test_tiny_chain_inplace_and_mask_by_hand(tiny):
    result = run(
        tiny,
        """
  impl relu1 = mask
  impl relu1.backward = from_mask
  impl relu2 = inplace
  impl relu2.backward = from_output
  forward
    keep a1.mask, a2, h3
  stage loss.backward
    free h3
  stage fc3.wgrad
  stage fc3.dgrad
  stage relu2.backward
    free a2
  stage fc2.wgrad
    recompute fc1, relu1
  stage fc2.dgrad
  stage relu1.backward
    free a1.mask
  stage fc1.wgrad
""",
    )
    assert result.valid, [e.format() for e in result.errors]
    expected = [
        F + A,
        F + 2 * A + M,  # relu1 emits a1 and its mask
        F + 2 * A + M,
        F + A + M,  # relu2 in place: no new storage
        F + 2 * A + M,
        F + 2 * A + M + 4,
        F + 3 * A + M + 8,
        F + 2 * A + M + 8 + W,  # from here on the caller's seed grad(l) (4 B) is held too
        F + 3 * A + M + 8,
        F + 3 * A + M + 8,
        F + 2 * A + M + 8,  # recompute fc1
        F + 3 * A + 2 * M + 8,  # recompute relu1: the kept mask plus a duplicate mask
        F + 2 * A + M + 8 + W,
        F + 2 * A + M + 8,
        F + 2 * A + M + 8,
        F + A + 8 + W,
    ]
    assert [s.peak for s in result.steps] == expected
    assert result.peak_bytes == F + 3 * A + 2 * M + 8
    assert result.peak_step.kind == "recompute" and result.peak_step.op == "relu1"
    # forward 954 (mask +4), recompute fc1 + relu1 = 324, backward 1552 (from_mask +2)
    assert result.compute_us == 954 + 324 + 1552
    assert result.overhead == pytest.approx(2830 / 2500 - 1)


def test_resblock_store_all_by_hand(resblock):
    a = 32 * 64 * 56 * 56 * 4
    s, k, c = 512, 8 * MiB, 147456
    f = resblock.network.fixed_bytes
    result = solve(resblock, "store-all").simulation
    expected = [
        f + a + k,  # conv1 with its workspace
        f + 2 * a + s,  # bn1: b1 and its statistics
        f + 3 * a + s,
        f + 3 * a + s + k,
        f + 4 * a + 2 * s,
        f + 5 * a + 2 * s,  # add
        f + 5 * a + 2 * s,  # relu2
        f + 6 * a + 2 * s,  # relu2.backward: + seed grad(y) + grad(s)
        # from here on the seed grad(y) stays: the caller's autograd holds it until the backward ends
        f + 7 * a + 2 * s,  # add.backward
        f + 7 * a + 2 * s + 512,  # bn2.backward: grad(c2) + two 256 B parameter-gradient temporaries
        f + 5 * a + s + c + k,  # conv2.wgrad
        f + 6 * a + s + k,  # conv2.dgrad
        f + 6 * a + s,
        f + 5 * a + s + 512,
        f + 3 * a + c + k,
    ]
    assert [st.peak for st in result.steps] == expected
    assert result.peak_bytes == f + 7 * a + 2 * s + 512


def test_in_place_destroys_its_input(resblock):
    # In-Place ABN needs BN's output; an in-place ReLU destroys it.
    result = solve(resblock, "store-all").schedule
    body = "".join(f"  impl {op} = {impl}\n" for op, impl in {**result.impls, "relu1": "inplace", "bn1.backward": "from_output"}.items())
    body += "  forward\n    keep c1, bn1.stats, b1, r1, c2, bn2.stats\n"
    for stage in result.stages:
        body += f"  stage {stage.backward}\n"
    sim = run(resblock, body)
    assert not sim.valid
    assert any("relu1 (inplace) overwrites b1 in place, but b1 is kept" in e.message for e in sim.errors)


VIEW_SPEC = """
network views
  tensor x f32[256] input
  op a (x) -> y f32[256] time 1us
  op v (y) -> yv f32[16,16] view of y time 0us
  op b (yv) -> z f32[256] time 1us
    backward reads (grad(z), yv) -> grad(yv) time 1us
  output z
"""


def test_a_kept_view_keeps_its_base_storage():
    spec = parse_spec(VIEW_SPEC)
    sim = run(spec, "  forward\n    keep yv\n  stage b.backward\n    free yv\n")
    assert sim.valid
    fixed = 1024
    # forward: a allocates y; the view allocates nothing; b allocates z
    assert [s.peak for s in sim.steps[:3]] == [fixed + 1024, fixed + 1024, fixed + 2048]
    # after the forward, y's storage is alive through yv: yv + z
    assert sim.steps[2].live_after == 2048
    # backward: seed grad(z) + new grad(yv)
    assert sim.steps[3].peak == fixed + 2048 + 1024 + 1024


ACCUMULATE_SPEC = """
network branch
  tensor x f32[256] input
  op a (x) -> y f32[256] time 1us
    backward reads (grad(y)) -> grad(x) time 1us
  op b (y) -> u f32[256] time 1us
    backward reads (grad(u)) -> grad(y) time 1us
  op c (y) -> v f32[256] time 1us
    backward reads (grad(v)) -> grad(y) time 1us
  op d (u, v) -> z f32[256] time 1us
    backward reads (grad(z)) -> grad(u), grad(v) time 1us
  output z
"""


def test_second_gradient_writer_adds_a_temporary():
    spec = parse_spec(ACCUMULATE_SPEC)
    sim = run(spec, "  forward\n  stage d.backward\n  stage c.backward\n  stage b.backward\n  stage a.backward\n")
    assert sim.valid, [e.format() for e in sim.errors]
    fixed = 1024
    backward = [s for s in sim.steps if s.kind == "backward"]
    live = [s.live_before for s in backward]
    peaks = [s.peak - fixed for s in backward]
    # d.backward: z + grad(z) live, allocates grad(u) and grad(v)
    assert (live[0], peaks[0]) == (2048, 4096)
    # c.backward: z, the seed grad(z) (held by the caller to the end), grad(u), grad(v); first writer of grad(y)
    assert (live[1], peaks[1]) == (4096, 5120)
    # b.backward: z, grad(z), grad(u), grad(y); its grad(y) is a temporary added into the first
    assert (live[2], peaks[2]) == (4096, 5120)
    assert backward[2].live_after == 3072  # the temporary and grad(u) are gone
    # the gradient of the input is not read by anything: released at once
    assert backward[3].live_after == 2048


def test_reading_a_gradient_before_all_its_writers_is_an_error():
    spec = parse_spec(ACCUMULATE_SPEC)
    sim = run(spec, "  forward\n  stage d.backward\n  stage c.backward\n  stage a.backward\n  stage b.backward\n")
    assert any("a.backward reads grad(y) before every op that writes it has run" in e.message for e in sim.errors)


@pytest.mark.parametrize(
    "body, message",
    [
        ("  impl relu1.backward = from_output\n  impl relu2 = plain\n  impl relu2.backward = from_output\n", "no implementation chosen for relu1"),
        ("  impl relu1 = fast\n", "relu1 has no implementation fast"),
        ("  impl nope = x\n", "there is no operator nope"),
        ("  stage fc1.wgrad\n  stage fc1.wgrad\n", "appears twice"),
        ("  stage fc1\n", "stage fc1: there is no backward op of that name (it is a forward op)"),
        ("  forward\n    keep x\n", "forward keep x: it is a input, not a forward tensor"),
        ("  stage loss.backward\n    free h3\n", "free h3, but h3 is not kept at this point"),
        ("  stage loss.backward\n    keep h1\n", "keep h1, but this stage does not recompute it"),
        ("  stage loss.backward\n    recompute fc1.wgrad\n", "there is no forward op of that name (it is a backward op)"),
        ("  stage loss.backward\n", "needs h3, which is not present (keep it earlier or recompute fc3 first)"),
        ("  stage loss.backward\n    free grad(h3)\n", "gradients are freed automatically"),
    ],
)
def test_illegal_schedules_are_explained(tiny, body, message):
    impls = "  impl relu1 = plain\n  impl relu1.backward = from_output\n  impl relu2 = plain\n  impl relu2.backward = from_output\n"
    if "impl" in body:
        impls = ""
    sim = run(tiny, impls + body)
    assert not sim.valid
    assert any(message in e.message for e in sim.errors), [e.message for e in sim.errors]


def test_missing_stages_and_derived_tensors(tiny):
    sim = run(tiny, "  impl relu1 = plain\n  impl relu1.backward = from_mask\n  impl relu2 = plain\n  impl relu2.backward = from_output\n")
    messages = [e.message for e in sim.errors]
    assert any(m.startswith("the schedule has no stage for loss.backward") for m in messages)
    sim = run(tiny, "  impl relu1 = plain\n  impl relu1.backward = from_mask\n  impl relu2 = plain\n  impl relu2.backward = from_output\n  forward\n    keep a1.mask\n")
    assert any("implementation plain of relu1 does not produce it" in e.message for e in sim.errors)


def test_recomputing_what_is_present_is_an_error(tiny):
    sim = run(tiny, "  impl relu1 = plain\n  impl relu1.backward = from_output\n  impl relu2 = plain\n  impl relu2.backward = from_output\n  forward\n    keep h3\n  stage loss.backward\n    recompute fc3\n")
    assert any("recompute fc3, but all its outputs are already present" in e.message for e in sim.errors)


def test_schedule_for_another_spec_is_refused(tiny):
    sched = parse_schedule('schedule for "x.monet" fingerprint 0123456789abcdef\n  stage fc1.wgrad\n')
    sim = simulate(tiny.network, sched, fingerprint=tiny.fingerprint)
    assert not sim.valid and "made for another spec" in sim.errors[0].message


def test_constraints_are_checked(tiny):
    store_all = solve(tiny, "store-all").schedule
    constraints = resolve_constraints(tiny.network, tiny.constraints, max_overhead=0.0)
    sim = simulate(tiny.network, store_all, constraints=constraints)
    assert sim.valid and not sim.ok
    assert "exceeds the budget 21.00 MiB" in sim.violations[0].message
    every = solve(tiny, "recompute-all").schedule
    sim = simulate(tiny.network, every, constraints=constraints)
    assert any(f"compute overhead {sim.overhead:.2%} exceeds the cap 0.00%" in v.message for v in sim.violations)
    pinned = resolve_constraints(tiny.network, parse_spec(tiny.source.replace("memory <= 21MiB", "never recompute fc1\n  keep a2\n  impl relu1 = mask")).constraints)
    sim = simulate(tiny.network, every, constraints=pinned)
    messages = " | ".join(v.message for v in sim.violations)
    first = next(stage.backward for stage in every.stages if "fc1" in stage.recompute)
    assert f"never recompute fc1, but stage {first} does" in messages
    assert "keep a2, but the forward pass does not keep it" in messages
    assert "allow relu1 only mask, but the schedule uses plain" in messages


def test_wasted_keeps_are_warned_about(tiny):
    sim = run(tiny, "  impl relu1 = plain\n  impl relu1.backward = from_output\n  impl relu2 = plain\n  impl relu2.backward = from_output\n  forward\n    keep a1, a2, h3\n" + "".join(f"  stage {s}\n" for s in ["loss.backward", "fc3.wgrad", "fc3.dgrad", "relu2.backward", "fc2.wgrad", "fc2.dgrad", "relu1.backward", "fc1.wgrad"]))
    assert sim.valid
    assert {w.message.split()[0] for w in sim.warnings} == {"a1", "a2", "h3"}
