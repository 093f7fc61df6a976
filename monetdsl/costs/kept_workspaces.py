"""FakeTensor workspace estimates kept in the measurement store, by graph.

Estimating every implementation's workspace (:mod:`.estimated_workspace`) runs each step
function on FakeTensors: about a second on a 20-op model, the largest part of planning
again a model whose schedule and measured costs are already kept. The estimates depend
only on what the steps run: the graph (its fingerprint), every op's calls and the layouts
of what each step reads and writes, and the library versions, all of which the ops'
signatures (:func:`~.signature.op_signature`) write down. So the whole report is kept
under one signature made of those, and read back when the same graph is traced again.
Only complete reports are kept (one with notes, a step that could not run, is estimated
again next time); an entry that does not cover every implementation is not used.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

from ..ir import Network, Spec
from .estimated_workspace import WorkspaceReport, measure_workspaces
from .signature import op_signature
from .store import MeasurementStore

__all__ = ["estimated_workspaces", "workspace_signature", "WORKSPACE_FORMAT"]

#: bumped when the estimates' meaning changes (entries of another format are misses)
WORKSPACE_FORMAT = 1


def workspace_signature(built) -> str | None:
    """What the workspace estimates of ``built`` (a traced
    :class:`~monetdsl.tracing.to_ir.BuiltNetwork`) depend on, as one short text; None when
    it carries no joint graph (nothing is estimated then)."""
    from ..lowering.program import _OpLowering, value_nodes

    network, node_of = built.network, value_nodes(built)
    if node_of is None:
        return None
    backward_of: dict[str, list] = {}
    for bop in network.backward_ops:
        backward_of.setdefault(bop.of, []).append(bop)
    digest = hashlib.sha256(f"graph {Spec(network).fingerprint}\n".encode())
    for record in built.records:
        if not network.has_op(record.name):
            continue
        op = network.op(record.name)
        low = _OpLowering(record, built.facts, built.value_names, network)
        digest.update(f"op {op.name}\n{op_signature(low, op, backward_of.get(op.name, []), node_of, 'cpu')}\n".encode())
    return f"monetdsl FakeTensor workspaces v{WORKSPACE_FORMAT} {digest.hexdigest()}"


def estimated_workspaces(built, store: MeasurementStore | None = None) -> WorkspaceReport:
    """:func:`~.estimated_workspace.measure_workspaces` of ``built``, read back from
    ``store`` when this graph's estimates are kept there, else estimated (and kept when
    complete). Without ``store`` it always estimates."""
    signature = workspace_signature(built) if store is not None else None
    if signature is not None:
        kept = _report_from(built.network, store.get(signature))
        if kept is not None:
            return kept
    report = measure_workspaces(built)
    if signature is not None and not report.notes:
        store.put(signature, _entry_of(report))
    return report


def _entry_of(report: WorkspaceReport) -> dict:
    entry: dict = {"workspace": {}, "aliased": {}}
    for (op, impl), nbytes in report.measured.items():
        entry["workspace"].setdefault(op, {})[impl] = nbytes
    for (op, impl, kind), nbytes in report.aliased.items():
        entry["aliased"].setdefault(op, {}).setdefault(impl, {})[kind] = nbytes
    return entry


def _report_from(network: Network, entry: dict | None) -> WorkspaceReport | None:
    """The report an entry holds, or None when it does not cover every implementation."""
    if entry is None:
        return None
    workspace, aliased = entry.get("workspace"), entry.get("aliased", {})
    if not isinstance(workspace, dict):
        return None
    measured = {(op, impl): nbytes for op, impls in workspace.items() for impl, nbytes in impls.items()}
    ops = (*network.forward_ops, *network.backward_ops)
    if set(measured) != {(op.name, impl.name) for op in ops for impl in op.impls} or any(
            not isinstance(v, int) for v in measured.values()):
        return None
    report = WorkspaceReport(network, measured=measured)
    report.aliased = {(op, impl, kind): nbytes for op, impls in aliased.items() for impl, kinds in impls.items()
                      for kind, nbytes in kinds.items()}
    report.network = network.with_impls(lambda op, i: _with_workspace(op, i, measured),
                                        lambda op, i: _with_workspace(op, i, measured))
    return report


def _with_workspace(op, impl, measured: dict):
    return replace(impl, workspace=measured[(op.name, impl.name)])
