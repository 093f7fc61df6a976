"""An op's signature: everything its measured costs depend on, written down as text.

Two ops with the same signature run the same kernels on tensors of the same layouts, so
one measurement serves both (the blocks of a ResNet stage, the layers of a decoder, the
same model planned again tomorrow). The text names:

* the machine: the device's name (the CPU model and thread count, or the GPU), torch's
  version, the oneDNN / cuDNN versions and the cuDNN settings in force;
* the op's captured aten calls, their non-tensor arguments and the layout (shape,
  strides, dtype) of every tensor argument;
* for every implementation of the op and of each of its backward steps: the layouts of
  what its step reads and writes, labelled by their place in the op (argument k, output
  k, a role, a derived tensor), never by the network's tensor names.
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

__all__ = ["machine_signature", "op_signature"]


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_signature(device: str) -> str:
    """The device and libraries measurements on ``device`` (``cpu`` or ``cuda``) depend on."""
    parts = [f"torch {torch.__version__}"]
    if str(device).startswith("cuda"):
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        cudnn = torch.backends.cudnn
        parts += [f"gpu {torch.cuda.get_device_name(index)} sm_{major}{minor}", f"cuda {torch.version.cuda}",
                  f"cudnn {cudnn.version()} enabled={cudnn.enabled} benchmark={cudnn.benchmark}"
                  f" deterministic={cudnn.deterministic} tf32={cudnn.allow_tf32}",
                  f"matmul tf32={torch.backends.cuda.matmul.allow_tf32}"]
    else:
        mkldnn = torch.backends.mkldnn
        parts += [f"cpu {_cpu_model()}", f"threads {torch.get_num_threads()}",
                  f"onednn {torch.backends.mkldnn.is_available() and mkldnn.enabled}"]
    return "; ".join(parts)


def _layout(value) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}{list(value.shape)}/{list(value.stride())}"
    return repr(value)


def _call_text(low) -> str:
    """The op's captured calls: targets, non-tensor arguments, tensor layouts (a member's
    result used by a later member is named by its position in the group)."""
    position = {node: k for k, node in enumerate(low.members)}

    def describe(arg):
        if isinstance(arg, fx.Node):
            if arg in position:
                return f"<call {position[arg]}>"
            return f"<{_layout_of_node(arg)}>"
        return arg

    lines = []
    for node in low.members:
        args = tree_map(describe, (node.args, node.kwargs))
        lines.append(f"call {node.target}: {args!r}")
    return "\n".join(lines)


def _layout_of_node(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_layout(v) for v in val) + ")"
    return _layout(val)


class _Labels:
    """Network-independent names for the tensors one op's steps read and write."""

    def __init__(self, low, op, node_of: dict):
        self.node_of, self.tensors = node_of, low.network.tensors
        self.label: dict[str, str] = {}
        for k, name in enumerate(low.out_names):
            self.label.setdefault(name, f"out{k}")
        for i, path in enumerate(low.paths):
            fixed = " fixed" if self.tensors[path.owner].is_fixed else ""
            self.label.setdefault(path.owner, f"arg{i}{fixed}")
        for role, name in sorted(low.role_names.items()):
            self.label.setdefault(name, f"role {role}")
        for impl in op.impls:
            for j, name in enumerate(impl.derived):
                self.label.setdefault(name, f"{impl.name} derived{j}")

    def __call__(self, name: str) -> str:
        if name.startswith("grad(") and name.endswith(")") and name not in self.label:
            return f"grad({self(name[5:-1])})"
        label = self.label.get(name, "other")
        node = self.node_of.get(name)
        if node is not None:
            return f"{label} {_layout_of_node(node)}"
        tensor = self.tensors.get(name)
        return f"{label} {tensor.dtype}{list(tensor.shape)}" if tensor is not None else label

    def many(self, names) -> str:
        return "[" + ", ".join(sorted(self(n) for n in names)) + "]"


def op_signature(low, op, backward_ops, node_of: dict, device: str) -> str:
    """The signature of forward op ``op`` (lowered as ``low``) with its ``backward_ops``,
    measured on ``device``."""
    labels = _Labels(low, op, node_of)
    kind = low.kind.name if low.kind is not None else "generic"
    lines = ["monetdsl op costs", f"machine: {machine_signature(device)}", f"kind {kind} {sorted(low.attrs.items())!r}",
             _call_text(low)]
    for impl in op.impls:
        overwrites = labels(impl.overwrites) if impl.overwrites else "-"
        lines.append(f"forward {impl.name}: reads {labels.many(op.inputs)} writes {labels.many((*op.outputs, *impl.derived))}"
                     f" overwrites {overwrites} recompute reads {labels.many(impl.recompute_reads)}")
    for bop in backward_ops:
        for impl in bop.impls:
            lines.append(f"backward {bop.local_name} {impl.name}: reads {labels.many(impl.reads)} writes"
                         f" {labels.many(bop.outputs)} accumulates {labels.many(impl.accumulates)}")
    return "\n".join(lines)
