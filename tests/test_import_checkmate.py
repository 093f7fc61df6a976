"""Checkmate / Moccasin node-link graphs: import, round trip, solve, errors."""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

from monetdsl.cli import main
from monetdsl.errors import MonetError
from monetdsl.grammar import format_spec, load_spec, parse_spec
from monetdsl.importers import network_from_node_link, node_link_from_network
from monetdsl.ir import Spec
from monetdsl.search import solve
from monetdsl.synth import layered_training_graph

DATA = Path(__file__).resolve().parent / "data" / "checkmate"


def same_graph(a: dict, b: dict) -> bool:
    ga = nx.node_link_graph(a, directed=True, edges="links")
    gb = nx.node_link_graph(b, directed=True, edges="links")
    match = nx.algorithms.isomorphism.categorical_node_match(["name", "backward", "cost_cpu", "cost_ram"], [None] * 4)
    return nx.is_isomorphic(ga, gb, node_match=match)


def test_hand_written_graph_imports_and_solves_by_hand(tmp_path):
    out = tmp_path / "chain3.monet"
    assert main(["import", "checkmate", str(DATA / "chain3.json"), "-o", str(out)]) == 0
    spec = load_spec(out)
    assert [op.name for op in spec.network.forward_ops] == ["input", "conv1", "relu1", "loss"]
    assert spec.network.op("grad_relu1").impls[0].reads == frozenset({"grad_loss", "relu1"})
    # store-all: input, relu1 and grad_loss live while grad_relu1 allocates its 4 KiB output
    assert solve(spec, "store-all").simulation.peak_bytes == 1024 + 4096 + 4096 + 4096
    for method in ("recompute-all", "chen-sqrt"):
        assert solve(spec, method).simulation.valid


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_through_the_spec_language(seed):
    data = layered_training_graph(8 + seed, seed)
    net = network_from_node_link(data, name=f"g{seed}")
    spec = parse_spec(format_spec(Spec(net)))  # through the text, as a user would
    assert same_graph(node_link_from_network(spec.network), data)
    assert solve(spec, "store-all").simulation.valid


def test_edges_key_and_units():
    data = json.loads((DATA / "chain3.json").read_text())
    data["edges"] = data.pop("links")
    net = network_from_node_link(data, time_unit="ms", memory_unit="KiB")
    assert net.op("conv1").impls[0].time_us == 10_000.0
    assert net.tensors["conv1"].nbytes == 4096 * 1024


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: (
                d["nodes"].append({"id": 7, "name": "late", "backward": False, "cost_cpu": 1, "cost_ram": 4}),
                d["links"].append({"source": 4, "target": 7}),
            ),
            "forward node 'late' depends on backward node 'grad_loss'",
        ),
        (lambda d: d["links"].append({"source": 3, "target": 0}), "cycle"),
        (lambda d: d["nodes"][1].__setitem__("cost_cpu", -1), "cost_cpu must be a non-negative number"),
        (lambda d: d["nodes"][1].__setitem__("cost_ram", "big"), "cost_ram must be a non-negative number"),
        (lambda d: d.pop("nodes"), "expected a networkx node-link object"),
    ],
)
def test_bad_graphs_are_explained(mutate, message):
    data = json.loads((DATA / "chain3.json").read_text())
    mutate(data)
    with pytest.raises(MonetError) as info:
        network_from_node_link(data)
    assert message in str(info.value)


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["import", "checkmate", str(bad)]) == 1
    assert f"{bad}:1:2: not valid JSON" in capsys.readouterr().err
    assert main(["import", "checkmate", str(tmp_path / "none.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["import", "checkmate", str(DATA / "chain3.json"), "--time-unit", "fortnight"]) == 1
    assert "unknown time unit" in capsys.readouterr().err
