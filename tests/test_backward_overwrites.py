"""Backward implementations that write their result over a gradient they read (``overwrites``).

A ReLU's backward or a shape-keeping convolution's input gradient may take the storage of
the output gradient where that gradient dies at the step: the step allocates nothing for
its result (only its workspace). These tests pin the language (round trip, every refusal
naming the reason), the simulator's accounting by hand, and that the MILP's own accounting
equals the simulator's step by step and its optimum the exhaustive search's at every
budget of the front, the hybrid's too.
"""
from __future__ import annotations

import pytest

from monetdsl.errors import SpecError
from monetdsl.grammar import parse_schedule, parse_spec
from monetdsl.grammar.printer import format_spec
from monetdsl.search import simulate, solve
from monetdsl.search.exhaustive import exhaustive_front
from monetdsl.search.impl_choice import undominated_backward_impls

from .test_milp_exact import check_against_exhaustive, milp_optimum

KIB = 1024

SPEC = """
network ow
  tensor x f32[256] input
  tensor w f32[64] param
  tensor w2 f32[64] param
  op a (x, w) -> y f32[256] time 1us
    backward wgrad reads (grad(y), x) -> grad(w) time 2us
  op r (y) -> z f32[256]
    impl plain time 1us
    impl mask -> z.mask u8[32] time 1us
    backward reads (grad(z)) -> grad(y)
      impl from_input reads (y) time 1us
      impl from_mask_inplace reads (z.mask) time 1us overwrites grad(z)
  op c (z, w2) -> v f32[256] time 4us
    backward wgrad reads (grad(v), z) -> grad(w2) time 2us
    backward dgrad reads (grad(v), w2) -> grad(z)
      impl default time 3us
      impl sliced_inplace time {sliced_time}us workspace 64B overwrites grad(v)
  op l (v) -> loss f32[1] time 1us
    backward reads (grad(loss)) -> grad(v) time 1us
  output loss
"""

FIXED = 256 * 4 + 2 * 64 * 4  # x, w, w2
HELD = 1024 + 4 + 4  # y (kept for r's backward), the output loss and its gradient (the seed)


def spec(sliced_time: int = 4, text: str | None = None):
    return parse_spec(text if text is not None else SPEC.format(sliced_time=sliced_time), "ow.monet")


def replay(s, dgrad: str, relu_bwd: str = "from_input", relu: str = "plain"):
    keep = "y, z, v" if relu == "plain" else "y, z, z.mask, v"
    body = (f"  impl r = {relu}\n  impl r.backward = {relu_bwd}\n  impl c.dgrad = {dgrad}\n  forward keep {keep}\n"
            "  stage l.backward\n    free v\n  stage c.wgrad\n    free z\n  stage c.dgrad\n  stage r.backward\n  stage a.wgrad\n")
    sched = parse_schedule(f'schedule for "ow.monet" fingerprint {s.fingerprint}\n' + body)
    sim = simulate(s.network, sched, fingerprint=s.fingerprint)
    assert sim.valid, [e.format() for e in sim.errors]
    return {step.op: step for step in sim.steps if step.kind == "backward"}


def test_the_result_takes_the_gradients_storage_and_the_workspace_counts():
    s = spec()
    plain, inplace = replay(s, "default"), replay(s, "sliced_inplace")
    # c.dgrad runs with y, loss, the seed and grad(v) live; out of place it allocates grad(z) (1 KiB),
    # in place only its 64 B workspace
    assert plain["c.dgrad"].peak == FIXED + HELD + KIB + KIB
    assert inplace["c.dgrad"].peak == FIXED + HELD + KIB + 64
    # afterwards the same bytes are live: grad(v) is gone either way, grad(z) holds its storage
    assert plain["c.dgrad"].live_after == inplace["c.dgrad"].live_after == HELD + KIB
    # the ReLU's backward written over grad(z): nothing new, grad(y) lives on in its storage
    masked = replay(s, "sliced_inplace", "from_mask_inplace", relu="mask")
    assert masked["r.backward"].peak == FIXED + HELD + 32 + KIB
    assert masked["r.backward"].live_after == masked["r.backward"].live_before == HELD + 32 + KIB


def test_round_trip_and_fingerprint():
    s = spec()
    text = format_spec(s)
    assert "overwrites grad(v)" in text and "overwrites grad(z)" in text
    again = parse_spec(text, "ow.monet")
    assert again.network == s.network and again.fingerprint == s.fingerprint
    plain = spec(text=SPEC.format(sliced_time=4).replace(" overwrites grad(v)", ""))
    assert plain.fingerprint != s.fingerprint  # what decides memory is in the fingerprint


@pytest.mark.parametrize("old, new, message", [
    # the weight-gradient step reads grad(v) after... no: before; but here c.wgrad is made to overwrite it
    ("    backward wgrad reads (grad(v), z) -> grad(w2) time 2us",
     "    backward wgrad reads (grad(v), z) -> grad(w2) time 2us overwrites grad(v)", "gradient"),
    ("      impl sliced_inplace time 4us workspace 64B overwrites grad(v)",
     "      impl sliced_inplace reads (grad(loss)) time 4us workspace 64B overwrites grad(loss)", "network output"),
    ("      impl sliced_inplace time 4us workspace 64B overwrites grad(v)",
     "      impl sliced_inplace time 4us workspace 64B overwrites grad(y)", "which it does not read"),
    ("  op c (z, w2) -> v f32[256] time 4us", "  op c (z, w2) -> v f32[512] time 4us", "differ in size"),
    ("  op a (x, w) -> y f32[256] time 1us", "  op a (x, w) -> y f32[256] time 1us\n  op a2 (z) -> u f32[1] time 1us\n"
     "    backward reads (grad(u)) -> grad(z) time 1us", "other writers"),
    ("    impl plain time 1us\n", "    impl plain time 1us\n    impl bad overwrites grad(y) time 1us\n", "cannot overwrite a gradient"),
])
def test_illegal_overwrites_are_refused_with_the_reason(old, new, message):
    text = SPEC.format(sliced_time=4)
    assert old in text
    with pytest.raises(SpecError) as err:
        parse_spec(text.replace(old, new, 1))
    assert message in str(err.value)


def test_an_overwrite_read_later_is_refused():
    """c.dgrad made to run its weight gradient after it: grad(v) is read after being overwritten."""
    text = SPEC.format(sliced_time=4)
    wgrad = "    backward wgrad reads (grad(v), z) -> grad(w2) time 2us\n"
    dgrad = ("    backward dgrad reads (grad(v), w2) -> grad(z)\n      impl default time 3us\n"
             "      impl sliced_inplace time 4us workspace 64B overwrites grad(v)\n")
    with pytest.raises(SpecError) as err:
        parse_spec(text.replace(wgrad + dgrad, dgrad + wgrad))
    assert "c.wgrad reads it later" in str(err.value)


@pytest.mark.parametrize("sliced_time", [3, 4])
def test_the_milp_accounts_it_as_the_simulator_and_finds_the_exhaustive_optimum(sliced_time):
    check_against_exhaustive(spec(sliced_time))


def test_the_lowest_peak_needs_both_and_the_engines_find_it():
    """Without c's weight gradient (which would hold z and grad(v) at once anyway) the
    lowest peak writes both backward steps over their incoming gradients."""
    s = spec(text=SPEC.format(sliced_time=4).replace("    backward wgrad reads (grad(v), z) -> grad(w2) time 2us\n", ""))
    front = exhaustive_front(s.network)
    lowest = min(front, key=lambda p: (p.peak_bytes, p.compute_us))
    assert lowest.schedule.impls["c.dgrad"] == "sliced_inplace"
    assert lowest.schedule.impls["r.backward"] == "from_mask_inplace"
    without = min(p.peak_bytes for p in front if p.schedule.impls.get("c.dgrad", "default") == "default")
    assert lowest.peak_bytes < without
    sim, schedule, _ = milp_optimum(s.network, None, objective="memory")
    assert sim.peak_bytes == lowest.peak_bytes
    for method in ("milp", "hybrid"):
        found = solve(s, method, memory_budget=lowest.peak_bytes)
        assert found.simulation.peak_bytes <= lowest.peak_bytes
        assert found.simulation.compute_us == pytest.approx(lowest.compute_us)
    check_against_exhaustive(s)


def test_an_in_place_backward_as_fast_dominates_its_out_of_place_twin():
    """64 B of workspace against a new 1 KiB gradient: as fast, the in-place step is a
    drop-in; slower, both stay (and the ReLU's twins read different tensors: both stay)."""
    assert undominated_backward_impls(spec(sliced_time=3).network) == {"c.dgrad": ("sliced_inplace",)}
    assert undominated_backward_impls(spec(sliced_time=4).network) == {}


def _with_overwriting_twins(spec, seed: int):
    """``spec`` with, for some backward implementations, a twin that writes its result over
    a gradient it reads wherever the memory model allows it (a little slower or not)."""
    import dataclasses
    import random

    from monetdsl.validate import backward_overwrite_problem

    rng = random.Random(seed)
    network = spec.network
    backward = []
    for bop in network.backward_ops:
        impls = list(bop.impls)
        for impl in bop.impls:
            for g in sorted(r for r in impl.reads if network.tensors[r].kind.value == "gradient"):
                twin = dataclasses.replace(impl, name=f"{impl.name}_ow", overwrites=g, time_us=impl.time_us + rng.choice([0, 1]))
                if backward_overwrite_problem(network, bop, twin) is None and rng.random() < 0.7:
                    impls.append(twin)
                    break
        backward.append(dataclasses.replace(bop, impls=tuple(impls)))
    changed = dataclasses.replace(network, backward_ops=tuple(backward))
    return parse_spec(format_spec(dataclasses.replace(spec, network=changed)), "random.monet"), len(
        [i for b in backward for i in b.impls if i.overwrites])


def _random_with_twins(count: int = 12) -> list:
    """The first ``count`` random networks (3 forward ops) where some backward step may
    overwrite a gradient (about one in ten)."""
    from monetdsl.synth import random_spec

    found = []
    for seed in range(1000):
        spec, twins = _with_overwriting_twins(random_spec(seed, forward_ops=3, max_impls=2), seed)
        if twins:
            found.append(pytest.param(spec, id=str(seed)))
        if len(found) == count:
            break
    return found


@pytest.mark.parametrize("spec_with_twins", _random_with_twins())
def test_random_networks_with_overwriting_twins_match_the_exhaustive_search(spec_with_twins):
    check_against_exhaustive(spec_with_twins)
