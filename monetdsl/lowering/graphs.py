"""fx plumbing: replay captured calls on real tensors, and derive local backward graphs.

The tracer folds views into the tensor that owns their storage, so the runtime holds
only owners. An op's argument is re-derived from its owner by replaying the captured
alias calls (:class:`ArgPath`), which allocates nothing.

A backward step whose implementation is PyTorch's own (the catalogue's first
alternative, or any op outside the catalogue) runs a *local backward graph*: the op is
traced alone with ``make_fx`` through ``torch.autograd.grad``, which records exactly the
aten calls eager autograd makes for it; the forward part is then cut away and what the
backward part reads from it becomes inputs (the op's arguments or outputs). So the
gradients equal eager PyTorch's bit for bit, and the tensors a step reads are checked
against what the spec says it reads. Gradients of arguments are turned into gradients
of their owners by a second traced graph, the backward of the alias calls (:func:`owner_adapter`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from ..tracing.joint import JointFacts, is_alias, packet_name

__all__ = [
    "ArgPath",
    "LocalBackward",
    "LoweringError",
    "arg_path",
    "call_node",
    "local_backward",
    "local_backwards",
    "adopt_local_backward",
    "owner_adapter_graphs",
    "adopt_owner_adapter_graph",
    "owner_adapter",
    "is_part_scatter",
    "run_group",
    "example_of",
]

_BN_FUNCTIONAL = "_native_batch_norm_legit_functional"


class LoweringError(ValueError):
    """The runtime cannot execute a captured op as the spec describes it."""


# ----------------------------------------------------------------------------- argument paths
@dataclass(frozen=True)
class ArgPath:
    """How to rebuild an fx value from the tensor that owns its storage: a chain of alias
    calls (``view``, ``t``, ``split`` then ``getitem``...) applied to ``owner``."""

    owner: str
    steps: tuple = ()

    def materialize(self, value: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            if step[0] == "getitem":
                value = value[step[1]]
            else:
                _, target, args, kwargs = step
                value = target(value, *args, **kwargs)
        return value

    @property
    def is_identity(self) -> bool:
        return not self.steps


def arg_path(facts: JointFacts, value_names: dict, node: fx.Node) -> ArgPath:
    """The :class:`ArgPath` of ``node`` (follows the same alias rules as the tracer)."""
    steps: list = []
    while node.op == "call_function":
        if node.target is operator.getitem:
            base = node.args[0]
            if is_alias(base):
                steps.append(("getitem", node.args[1]))
                node = base
                continue
            if packet_name(base.target) == _BN_FUNCTIONAL and node.args[1] in (3, 4):
                node = base.args[node.args[1]]  # the updated running statistics are the buffers
                continue
            break
        if node in facts.saved_clones:
            node = node.args[0]  # a copy autograd keeps of an in-place op's input: the same value
            continue
        if is_alias(node):
            extra = tuple(node.args[1:])
            if any(isinstance(a, fx.Node) for a in _flatten(extra) + _flatten(tuple(node.kwargs.values()))):
                raise LoweringError(f"view {node.name} takes a tensor argument; the runtime cannot re-derive it")
            steps.append(("call", node.target, extra, dict(node.kwargs)))
            node = node.args[0]
            continue
        break
    owner = facts.owner(node)
    if owner not in value_names:
        raise LoweringError(f"value {node.name} is not a tensor of the spec")
    return ArgPath(value_names[owner], tuple(reversed(steps)))


def _flatten(items) -> list:
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def call_node(node: fx.Node, value_of: Callable[[fx.Node], Any]):
    """Call ``node``'s target with its fx arguments replaced by ``value_of(arg)``."""
    def conv(a):
        return value_of(a) if isinstance(a, fx.Node) else a

    args = tree_map(conv, node.args) if node.args else ()
    kwargs = tree_map(conv, dict(node.kwargs)) if node.kwargs else {}
    return node.target(*args, **kwargs)


# ------------------------------------------------------------------------- local backward graphs
def example_of(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise LoweringError(f"{node.name} has no tensor metadata")
    return val


def _fake_like(mode, val: torch.Tensor) -> torch.Tensor:
    with mode:
        return torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=val.device)


@dataclass
class LocalBackward:
    """A traced backward of one op (or one fused group) for one set of wanted gradients.

    Call with the values of ``args_read`` (argument positions), then ``outputs_read``
    (output positions), then the output gradients (in ``grads_given`` order); returns the
    gradients of the wanted arguments, in ``wanted`` order (``None`` where none flows).
    """

    module: fx.GraphModule
    args_read: tuple[int, ...]
    outputs_read: tuple[int, ...]
    grads_given: tuple[int, ...]
    wanted: tuple[int, ...]

    def __call__(self, *values):
        return self.module(*values)


_CACHE: dict = {}


def _signature(members: Sequence[fx.Node], arg_nodes: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> tuple:
    """A hashable description of a group of calls, independent of node identities."""
    local = {n: ("arg", i) for i, n in enumerate(arg_nodes)}
    parts = []
    for k, node in enumerate(members):
        def conv(a):
            if isinstance(a, fx.Node):
                if a in local:
                    return local[a]
                raise LoweringError(f"{node.name} reads {a.name}, which is neither an argument nor an earlier member")
            if isinstance(a, (list, tuple)):
                return tuple(conv(b) for b in a)
            if isinstance(a, torch.dtype) or isinstance(a, torch.device):
                return str(a)
            return a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)

        parts.append((str(node.target), conv(tuple(node.args)), tuple(sorted((k2, conv(v)) for k2, v in node.kwargs.items()))))
        local[node] = ("member", k)
        if node.target is not operator.getitem:
            for user in node.users:
                if user.target is operator.getitem:
                    local[user] = ("member_item", k, user.args[1])
    metas = tuple((tuple(v.shape), tuple(v.stride()), str(v.dtype), str(v.device)) for v in (example_of(n) for n in arg_nodes))
    outs = tuple(local.get(o, ("?", o.name)) for o in outputs)
    return (tuple(parts), metas, outs)


def run_group(members: Sequence[fx.Node], arg_nodes: Sequence[fx.Node], values: Sequence, outputs: Sequence[fx.Node],
              owner: str = "the group") -> list:
    """Run the captured calls ``members`` on ``values`` of ``arg_nodes``; the ``outputs``'
    values, in order (``owner`` names the group in errors)."""
    env: dict = dict(zip(arg_nodes, values))

    def value_of(n):
        if n in env:
            return env[n]
        if n.target is operator.getitem and n.args[0] in env:
            return env[n.args[0]][n.args[1]]
        raise LoweringError(f"{n.name} is not available inside {owner}")

    for node in members:
        env[node] = call_node(node, value_of)
    return [value_of(o) for o in outputs]


def local_backward(
    members: Sequence[fx.Node],
    arg_nodes: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    wanted: Sequence[int],
    grads_given: Sequence[int],
    resident: Sequence[int] = (),
) -> LocalBackward:
    """Trace the backward of ``members`` (calls reading ``arg_nodes``, producing ``outputs``)
    for the gradients of the arguments at positions ``wanted``, given the gradients of the
    outputs at positions ``grads_given``. Cached by the group's signature."""
    key = (_signature(members, arg_nodes, outputs), tuple(wanted), tuple(grads_given), tuple(sorted(resident)))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    arg_examples = [_fake_like(mode, example_of(n)) for n in arg_nodes]
    grad_examples = [_fake_like(mode, example_of(outputs[i])) for i in grads_given]
    n_args = len(arg_nodes)
    wanted = tuple(wanted)

    def joint(*flat):
        args, grads = flat[:n_args], flat[n_args:]
        leaves = [a.detach().requires_grad_(i in wanted and (a.is_floating_point() or a.is_complex())) for i, a in enumerate(args)]
        outs = run_group(members, arg_nodes, leaves, outputs)
        diff = [(outs[i], g) for i, g in zip(grads_given, grads) if isinstance(outs[i], torch.Tensor) and outs[i].requires_grad]
        inputs = [leaves[i] for i in wanted if leaves[i].requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in diff], inputs, [g for _, g in diff], allow_unused=True) if diff and inputs else ())
        result = [next(got) if leaves[i].requires_grad else None for i in wanted]
        return (*result, *outs)

    with torch.autograd.set_grad_enabled(True), mode:
        traced = make_fx(joint, tracing_mode="real")(*arg_examples, *grad_examples)
    result = _cut_backward(traced, n_args, len(grads_given), len(wanted), len(outputs), set(resident))
    local = LocalBackward(result[0], result[1], result[2], tuple(grads_given), wanted)
    _CACHE[key] = local
    return local


def _cut_backward(traced: fx.GraphModule, n_args: int, n_grads: int, n_wanted: int, n_outputs: int, resident: set = frozenset()):
    """Keep the part of a traced joint graph that computes the wanted gradients; what it
    reads from the forward part becomes inputs (arguments and outputs of the op)."""
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    arg_ph, grad_ph = placeholders[:n_args], placeholders[n_args:]
    out_node = next(n for n in graph.nodes if n.op == "output")
    results = list(out_node.args[0])
    grad_results, fwd_outputs = results[:n_wanted], results[n_wanted:]
    # the backward part: what autograd ran after the forward calls (its formulas may also
    # compute from saved values alone, e.g. 2 * x for pow), and anything using a gradient
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    boundary = max((position[n] for n in fwd_outputs if isinstance(n, fx.Node)), default=-1)
    backward = set(grad_ph)
    for node in nodes:
        if node.op == "call_function" and (position[node] > boundary or any(a in backward for a in node.all_input_nodes)):
            backward.add(node)
    _conv_backward_without_unread_tensors(graph, backward, {ph: i for i, ph in enumerate(arg_ph)}, resident)
    grad_results = list(out_node.args[0])[:n_wanted]  # the rewrite above may have replaced some
    output_index = {n: k for k, n in enumerate(fwd_outputs) if isinstance(n, fx.Node)}
    arg_index = {n: i for i, n in enumerate(arg_ph)}
    needed: set = set()
    stack = [n for n in grad_results if isinstance(n, fx.Node)]
    reads_args: set[int] = set()
    reads_outputs: set[int] = set()
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node in arg_index:
            reads_args.add(arg_index[node])
            continue
        if node in output_index and node not in backward:
            reads_outputs.add(output_index[node])
            continue
        if node.op == "placeholder":
            continue
        if node not in backward and not _is_view_like(node) and not _constant(node, arg_index, output_index):
            raise LoweringError(f"the backward reads {node.name} ({packet_name(node.target)}), which the forward does not keep")
        stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env: dict = {}
    args_read = tuple(sorted(reads_args))
    outputs_read = tuple(sorted(reads_outputs))
    for i in args_read:
        env[arg_ph[i]] = new.placeholder(f"arg{i}")
    for k in outputs_read:
        env[fwd_outputs[k]] = new.placeholder(f"out{k}")
    for j, ph in enumerate(grad_ph):
        env[ph] = new.placeholder(f"grad{j}")
    for node in graph.nodes:
        if node in needed and node not in env and node.op == "call_function":
            if node.target is torch.ops.aten.detach.default:
                # autograd detaches what it saves; the runtime builds no graph, so each one
                # would only be a Python-level call per step (179 of them on a ResNet-18)
                env[node] = env[node.args[0]]
                continue
            env[node] = new.node_copy(node, lambda a: env[a])
    new.output(tuple(env[n] if isinstance(n, fx.Node) else None for n in grad_results))
    new.eliminate_dead_code()
    return fx.GraphModule(torch.nn.Module(), new), args_read, outputs_read


def _root_arg(node: fx.Node, arg_of: dict):
    """The argument position a value is an alias of (``detach(arg)``...), if any."""
    while node not in arg_of and node.op == "call_function" and _is_view_like(node) and node.args:
        node = node.args[0]
    return arg_of.get(node)


def _constant(node: fx.Node, arg_index: dict, output_index: dict) -> bool:
    """A value that depends on no argument and no output (``zeros``, ``full``...): the
    backward may compute it itself."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or n in arg_index or n in output_index:
            return False
        stack.extend(n.all_input_nodes)
    return True


def _is_view_like(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target is operator.getitem or is_alias(node))


def _conv_backward_without_unread_tensors(graph: fx.Graph, backward: set, arg_of: dict, resident: set) -> None:
    """``convolution_backward`` takes the input and the weight even when it computes only
    one gradient, which needs just the other tensor's shape, so an input-gradient step
    would read (and keep alive) the activation. The input gradient alone becomes the
    transposed convolution of the output gradient (:func:`_input_grad_as_transposed`);
    otherwise the unneeded tensor is given a one-element stand-in."""
    for node in list(graph.nodes):
        if node not in backward or packet_name(getattr(node, "target", None)) != "convolution_backward":
            continue
        mask = node.args[10]
        if _input_grad_as_transposed(graph, node, backward):
            continue
        # the input gradient needs the weight and only the input's shape; the weight
        # gradient needs the input and only the weight's shape (so a weight that is an
        # activation, a cast under autocast, is not read by the weight-gradient step)
        for position, needed in ((1, mask[1]), (2, mask[0])):
            if needed or _root_arg(node.args[position], arg_of) in resident:
                continue  # a resident tensor (a parameter) costs nothing to pass; a stand-in would be copied
            original = node.args[position]
            val = example_of(original)
            with graph.inserting_before(node):
                tiny = graph.call_function(torch.ops.aten.new_empty.default, (node.args[0], [1]), {"dtype": val.dtype})
                stand_in = graph.call_function(torch.ops.aten.expand.default, (tiny, list(val.shape)))
            node.update_arg(position, stand_in)
            backward.update({tiny, stand_in})


def _input_grad_as_transposed(graph: fx.Graph, node: fx.Node, backward: set) -> bool:
    """Replace a ``convolution_backward`` that computes only the input gradient by the
    transposed convolution of the output gradient with the weight, or, for a transposed
    convolution, by the plain one (both data-gradient kernels: bit for bit eager's
    gradient in every case the tests run on oneDNN; on cuDNN not yet checked).
    ``convolution_backward`` makes its input contiguous even when it reads only its
    shape, so a stand-in would be copied to a full input-sized temporary (+0.4 ms on a
    8x64x16x16 input on the development machine); the replacement needs no input at all.
    The output padding restores the input's size where the stride dropped rows. Returns
    False (nothing changed) for other masks, or when the shapes do not come out right."""
    (grad, x, weight, _bias, stride, padding, dilation, transposed, _out_pad, groups, mask) = node.args
    if list(mask) != [True, False, False]:
        return False
    if any(user.target is not operator.getitem or (user.args[1] != 0 and user.users) for user in node.users):
        return False  # something reads a gradient this call does not compute
    x_val, grad_val, w_val = example_of(x), example_of(grad), example_of(weight)
    if not (x_val.dtype == grad_val.dtype == w_val.dtype):
        return False
    output_padding = []
    for i in range(x_val.dim() - 2):
        reach = dilation[i] * (w_val.shape[2 + i] - 1) + 1
        if transposed:  # the plain convolution of the output gradient must come back to the input's size
            if (grad_val.shape[2 + i] + 2 * padding[i] - reach) // stride[i] + 1 != x_val.shape[2 + i]:
                return False
            output_padding.append(0)
            continue
        extra = x_val.shape[2 + i] - ((grad_val.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + reach)
        if not 0 <= extra < max(stride[i], dilation[i]):
            return False
        output_padding.append(extra)
    with graph.inserting_before(node):
        dgrad = graph.call_function(torch.ops.aten.convolution.default, (grad, weight, None, list(stride), list(padding),
                                                                         list(dilation), not transposed, output_padding, groups))
    backward.add(dgrad)
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(dgrad)  # the call and its getitems are left unused
    return True


def local_backwards() -> dict:
    """The local backwards traced (or adopted) in this process, by the key
    :func:`local_backward` caches them under: what a later process may adopt."""
    return dict(_CACHE)


def adopt_local_backward(key: tuple, local: LocalBackward) -> None:
    """Use ``local`` for the group of calls ``key`` names instead of tracing it (one kept
    by an earlier process; tracing it costs tens of milliseconds and TorchDynamo's import)."""
    _CACHE.setdefault(key, local)


# ------------------------------------------------------------------------------ owner adapters
_ADAPTERS: dict = {}


def owner_adapter_graphs() -> dict:
    """The owner adapters' traced graphs made (or adopted) in this process, by the key
    :class:`_Adapter` caches them under: what a later process may adopt."""
    return dict(_ADAPTERS)


def adopt_owner_adapter_graph(key: tuple, module: fx.GraphModule) -> None:
    """Use ``module`` for the owner adapter ``key`` names instead of tracing it (one kept
    by an earlier process)."""
    _ADAPTERS.setdefault(key, module)


def owner_adapter(owner_example: torch.Tensor, paths: Sequence[ArgPath]) -> Callable | None:
    """``f(*grads of the views) -> grad of the owner``: the backward of the alias calls
    that derive each view from the owner (a sum when several views are given, as autograd
    forms it). ``None`` when the single path is the owner itself.

    A single view that is part of its owner, without repeated elements (one time step
    of an unrolled recurrent layer's input projection: a ``split`` then an ``unbind``),
    is written into a zero owner-sized gradient (:class:`_PartScatter`). Otherwise the
    backward of a view depends on the layout of the gradient it receives (``view``
    needs compatible strides), so the graph is traced on first call for each layout."""
    if len(paths) == 1 and paths[0].is_identity:
        return None
    owner_meta = (tuple(owner_example.shape), tuple(owner_example.stride()), owner_example.dtype, owner_example.device)
    if len(paths) == 1 and _distinct_part(owner_meta, paths[0]):
        return _PartScatter(owner_meta, paths[0])
    return _Adapter(owner_meta, tuple(paths))


def _distinct_part(owner_meta: tuple, path: ArgPath) -> bool:
    """Whether ``path`` selects fewer elements than its owner has, none of them twice
    (no expand, no overlapping strides): then its owner's gradient is the view's
    gradient where the view lies and zeros elsewhere."""
    shape, stride, dtype, _ = owner_meta
    try:
        view = path.materialize(torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
    except RuntimeError:
        return False
    if view.numel() >= math.prod(shape):
        return False  # a view of the whole owner: its traced backward is itself a view
    reach = 0
    for step, size in sorted((st, sz) for sz, st in zip(view.shape, view.stride()) if sz > 1):
        if step <= reach:
            return False
        reach += step * (size - 1)
    return True


def is_part_scatter(adapter) -> bool:
    """Whether an owner adapter writes one part into zeros (:class:`_PartScatter`)."""
    return isinstance(adapter, _PartScatter)


class _PartScatter:
    """The gradient of an owner from that of one distinct part of it: a zero tensor of the
    owner's layout with the part's gradient copied in. Autograd's backward of the alias
    calls forms the same values from a zero piece per other slice (a ``stack`` of 31
    zeros and a ``cat`` per time step of a 32-step GRU): 60-odd calls and an owner-sized
    workspace where this makes three calls and nothing beside its output."""

    def __init__(self, owner_meta: tuple, path: ArgPath):
        self.shape, self.stride, self.dtype, self.device = owner_meta
        self.path = path

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        owner = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=grad.device).zero_()
        self.path.materialize(owner).copy_(grad)
        return owner


class _Adapter:
    def __init__(self, owner_meta: tuple, paths: tuple):
        self.owner_meta = owner_meta
        self.paths = paths
        self.path_key = tuple(_path_key(p) for p in paths)
        self.modules: dict = {}

    def __call__(self, *grads):
        layout = tuple((g.shape, g.stride(), g.dtype) for g in grads)
        forward = self.modules.get(layout)
        if forward is None:
            key = (self.owner_meta, self.path_key, tuple((tuple(g.shape), tuple(g.stride()), g.dtype) for g in grads))
            module = _ADAPTERS.get(key)
            if module is None:
                module = _ADAPTERS[key] = self._trace(grads)
            forward = self.modules[layout] = module.forward
        return forward(*grads)[0]

    def _trace(self, grads) -> fx.GraphModule:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx

        shape, stride, dtype, device = self.owner_meta
        mode = FakeTensorMode()
        with mode:
            owner = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        fakes = [_fake_like(mode, g) for g in grads]
        paths = self.paths

        def vjp(owner_value, *view_grads):
            leaf = owner_value.detach().requires_grad_()
            outs = materialize_shared(leaf, paths)
            return (torch.autograd.grad(outs, [leaf], list(view_grads), allow_unused=True)[0],)

        with torch.autograd.set_grad_enabled(True), mode:
            traced = make_fx(vjp, tracing_mode="real")(owner, *fakes)
        module, args_read, _ = _cut_backward(traced, 1, len(fakes), 1, 0)
        if args_read:
            raise LoweringError("the backward of a view reads the viewed tensor's values")
        return module


def materialize_shared(owner: torch.Tensor, paths: Sequence[ArgPath]) -> list[torch.Tensor]:
    """Views of ``owner`` along several paths, calling each shared prefix once: three
    ``getitem``s of one ``split`` come from a single split, so autograd's backward of
    the split is one ``cat`` of their gradients, as in eager autograd."""
    made: dict = {(): owner}
    out = []
    for path in paths:
        value, prefix = owner, ()
        for step, key in zip(path.steps, _path_key(path)):
            prefix = prefix + (key,)
            if prefix not in made:
                made[prefix] = ArgPath("", (step,)).materialize(value)
            value = made[prefix]
        out.append(value)
    return out


def _path_key(path: ArgPath) -> tuple:
    out = []
    for step in path.steps:
        if step[0] == "getitem":
            out.append(step)
        else:
            out.append((str(step[1]), repr(step[2]), repr(sorted(step[3].items()))))
    return tuple(out)
