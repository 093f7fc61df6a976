"""The language: parse -> print -> parse gives the same IR; the printed form is stable."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings

from monetdsl.grammar import format_constraints, format_network, format_spec, load_spec, parse_document, parse_spec
from monetdsl.ir import TensorKind
from monetdsl.validate import validate_network

from .spec_files import SHIPPED_SPEC_FILES, SHIPPED_SPEC_NAMES
from .strategies import constraints, networks

SPECS = SHIPPED_SPEC_FILES


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_print_then_parse_gives_the_same_network(net):
    assume(validate_network(net) == [])  # rarely, random gradient reads form a cycle
    text = format_network(net)
    parsed = parse_document(text, "<random>").network
    assert parsed == net
    assert format_network(parsed) == text


@settings(max_examples=100, deadline=None)
@given(constraints())
def test_print_then_parse_gives_the_same_constraints(c):
    text = "network n\n  tensor x f32[1] input\n\n" + format_constraints(c)
    parsed = parse_document(text).constraints
    if c.is_empty():
        assert parsed is None
    else:
        assert parsed == c


def test_the_list_of_shipped_specs_is_complete():
    """Every traced spec the regeneration script writes is on the list the tests read."""
    from monetdsl.models.shipped import SHIPPED

    assert {entry.name for entry in SHIPPED} <= set(SHIPPED_SPEC_NAMES)
    assert all(path.is_file() for path in SPECS)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_round_trip(path):
    spec = load_spec(path)
    text = format_spec(spec)
    again = parse_spec(text, str(path))
    assert again.network == spec.network
    assert again.constraints == spec.constraints
    assert format_spec(again) == text
    assert again.fingerprint == spec.fingerprint


def test_fingerprint_ignores_layout_comments_and_times_but_not_the_graph():
    a = parse_spec("network n\n  tensor x f32[4] input\n  op a (x) -> y f32[4] time 1us\n  output y\n")
    b = parse_spec("# a comment\nnetwork n\n    tensor x f32[4]   input  # the batch\n\n    op a (x) -> y f32[4] time 1000ns\n    output y\n")
    c = parse_spec("network n\n  tensor x f32[4] input\n  op a (x) -> y f32[4] time 2us\n  output y\n")
    d = parse_spec("network n\n  tensor x f32[8] input\n  op a (x) -> y f32[8] time 1us\n  output y\n")
    e = parse_spec("network n\n  tensor x f32[4] input\n  op a (x) -> y f32[4] time 1us workspace 1KiB\n  output y\n")
    assert a.fingerprint == b.fingerprint == c.fingerprint  # times: a schedule stays valid
    assert len({a.fingerprint, d.fingerprint, e.fingerprint}) == 3  # sizes and workspaces decide memory


def test_units_and_sizes():
    spec = parse_spec(
        """
network units
  fixed opt 1.5KB
  tensor x f32[2,3] 24B input
  tensor p 2KiB param
  op a (x, p) -> y u1[9], z bf16[] time 1.5ms workspace 1MB recompute time 250 ns
  output y
"""
    )
    net = spec.network
    assert net.fixed[0].nbytes == 1500
    assert net.tensors["x"].nbytes == 24
    assert net.tensors["p"].nbytes == 2048
    assert net.tensors["y"].nbytes == 2  # 9 bits round up to 2 bytes
    assert net.tensors["z"].nbytes == 2
    impl = net.forward_ops[0].impls[0]
    assert impl.time_us == 1500.0 and impl.workspace == 1_000_000 and impl.recompute_time_us == 0.25
    assert net.fixed_bytes == 1500 + 24 + 2048


def test_nesting_attaches_impls_and_backward_ops():
    spec = parse_spec(
        """
network n
  tensor x f32[4] input
  op relu (x) -> y f32[4]
    impl plain time 1us
    impl mask -> y.mask u1[4] time 2us
    backward reads (grad(y)) -> grad(x)
      impl from_output reads (y) time 3us
      impl from_mask reads (
          y.mask,
      ) time 4us
  backward extra reads (y) -> g 8B time 1us
  output y
"""
    )
    net = spec.network
    relu = net.forward_ops[0]
    assert relu.impl_names == ("plain", "mask")
    assert relu.impl("mask").derived == ("y.mask",)
    bwd = net.op("relu.backward")
    assert bwd.of == "relu" and bwd.outputs == ("grad(x)",)
    assert bwd.impl("from_mask").reads == frozenset({"grad(y)", "y.mask"})
    extra = net.op("extra")
    assert extra.of is None and net.tensors["g"].kind is TensorKind.GRADIENT
    assert net.tensors["grad(x)"].grad_of == "x"


def test_quoted_names_and_dotted_module_paths():
    spec = parse_spec(
        """
network "my net"
  tensor "time" f32[1] input
  op layer1.0.conv1 ("time") -> "out put" f32[1] time 1us
  output "out put"
"""
    )
    assert spec.network.name == "my net"
    assert spec.network.forward_ops[0].name == "layer1.0.conv1"
    assert '"out put"' in format_network(spec.network)
    assert parse_spec(format_network(spec.network)).network == spec.network


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["store-all", "recompute-all", "chen-sqrt"])
def test_schedules_round_trip(path, method):
    from monetdsl.grammar import format_schedule, parse_schedule
    from monetdsl.search import simulate, solve

    spec = load_spec(path)
    schedule = solve(spec, method, memory_budget=1 << 40).schedule
    text = format_schedule(schedule, spec.network, header=["a comment"], stage_notes={1: "note"})
    again = parse_schedule(text)
    assert again == schedule
    assert format_schedule(again, spec.network, header=["a comment"], stage_notes={1: "note"}) == text
    assert simulate(spec.network, again, fingerprint=spec.fingerprint).peak_bytes == simulate(spec.network, schedule).peak_bytes
