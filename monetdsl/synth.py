"""Synthetic specs: seeded random tiny networks (tests) and stacks of blocks (benchmarks).

* :func:`random_spec` draws a small network with skip connections and several
  implementations per operator: in-place variants, derived tensors (a compact mask, an RNG
  state read back by the recomputation), different backward reads, recompute times,
  workspaces, views, split weight/data gradients (some adding into the parameter gradient
  in place). The same seed gives the same spec.
* :func:`resnet_stack` and :func:`transformer_stack` repeat the shipped ResNet basic block
  and transformer block ``n`` times: the size ladder of the MILP benchmark.
* :func:`layered_training_graph` draws a seeded layered DAG in Checkmate's node-link format
  with the backward graph Checkmate derives from it: the plain graphs (one
  implementation per op, no in-place) of the large-graph benchmarks.

All of them write ``.monet`` text and parse it, so what they produce is exactly what a user
could have written (and passes the same validation).
"""
from __future__ import annotations

import random

from .errors import MonetError
from .grammar.parser import parse_spec
from .ir import Spec
from .validate import validate_spec

__all__ = ["random_spec", "random_spec_text", "resnet_stack", "transformer_stack", "layered_training_graph", "layered_spec"]


def random_spec_text(seed: int, *, forward_ops: int = 3, max_impls: int = 3, views: bool = True) -> str:
    """The text of a random network with ``forward_ops`` forward operators."""
    rng = random.Random(seed)
    lines = [f"network rnd{seed}"]
    if rng.random() < 0.5:
        lines.append(f"  fixed state {rng.choice([0, 64, 512])}B")
    lines.append(f"  tensor x f32[{rng.randint(4, 64)}] input")
    lines.append("  tensor w f32[16] param")
    tensors = ["x"]  # readable tensors in order
    sizes = {"x": None}
    consumed: dict[str, int] = {}
    ops = []
    for i in range(forward_ops):
        name = f"f{i}"
        out = f"t{i}"
        prev = tensors[-1]
        inputs = [prev]
        if len(tensors) > 2 and rng.random() < 0.35:
            skip = rng.choice(tensors[:-1])
            if skip not in inputs:
                inputs.append(skip)
        make_view = views and i > 0 and i < forward_ops - 1 and rng.random() < 0.2 and sizes.get(prev)
        if make_view:
            ops.append(dict(name=name, inputs=[prev], out=out, view_of=prev, elems=sizes[prev]))
            sizes[out] = sizes[prev]
        else:
            elems = rng.randint(4, 64)
            sizes[out] = elems
            ops.append(dict(name=name, inputs=inputs, out=out, view_of=None, elems=elems))
        for inp in ops[-1]["inputs"]:
            consumed[inp] = i
        tensors.append(out)
    last = ops[-1]["out"]
    for op in ops:
        lines.extend(_op_lines(rng, op, ops, consumed, last, max_impls))
    outputs = [last]
    if len(ops) >= 3 and rng.random() < 0.2:  # a second output: its gradient is a seed that a backward op also writes
        extra = rng.choice([op["out"] for op in ops[:-1] if op["view_of"] is None] or [last])
        if extra not in outputs:
            outputs.append(extra)
    lines.append(f"  output {', '.join(outputs)}")
    return "\n".join(lines) + "\n"


def _op_lines(rng, op, ops, consumed, last, max_impls) -> list[str]:
    name, out, inputs = op["name"], op["out"], op["inputs"]
    acts = [t for t in inputs if t != "x"]
    if op["view_of"] is not None:
        head = f"  op {name} ({inputs[0]}) -> {out} f32[{op['elems']}] view of {op['view_of']} time 0us"
        grads = ", ".join(f"grad({t})" for t in acts) or "grad(x)"
        return [head, f"    backward reads (grad({out})) -> {grads} time {rng.randint(1, 5)}us"]
    lines = [f"  op {name} ({', '.join(inputs)}) -> {out} f32[{op['elems']}]"]
    impls = []
    n_impls = rng.randint(1, max_impls)
    base_time = rng.randint(2, 20)
    kinds = ["plain"]
    # in place over an activation input of the same size that no later op reads
    target = inputs[0]
    same_size = target != "x" and _elems(ops, target) == op["elems"] and _is_plain_storage(ops, target)
    if same_size and consumed.get(target) == int(name[1:]) and target != last:
        kinds.append("inplace")
    kinds += ["mask", "rng", "slow"]
    chosen = ["plain"] + rng.sample(kinds[1:], min(n_impls - 1, len(kinds) - 1))
    derived_mask = f"{out}.m"
    derived_rng = f"{out}.r"
    for kind in chosen:
        ws = rng.choice([0, 0, 32, 256])
        wtxt = f" workspace {ws}B" if ws else ""
        if kind == "plain":
            rt = rng.choice(["", f" recompute time {max(1, base_time - rng.randint(0, 3))}us"])
            impls.append(f"    impl plain time {base_time}us{wtxt}{rt}")
        elif kind == "inplace":
            impls.append(f"    impl inplace overwrites {target} time {base_time}us{wtxt}")
        elif kind == "mask":
            impls.append(f"    impl mask -> {derived_mask} u8[{rng.randint(1, 8)}] time {base_time + rng.randint(0, 3)}us{wtxt}")
        elif kind == "rng":
            impls.append(
                f"    impl rng -> {derived_rng} u8[4] time {base_time + 1}us{wtxt} recompute reads ({derived_rng})"
            )
        elif kind == "slow":
            impls.append(f"    impl slow time {base_time + rng.randint(1, 6)}us")
    if len(impls) == 1:
        lines[0] += f" time {base_time}us"
    else:
        lines.extend(impls)
    grads = [f"grad({t})" for t in acts]
    use_param = rng.random() < 0.3
    if use_param:
        wgrad_time = rng.randint(1, 10)
        side = random.Random(f"{wgrad_time}-{out}-{inputs[0]}")  # the main draws stay as they were
        if side.random() < 0.5:  # a second implementation adding into grad(w) in place, in pieces
            lines.append(f"    backward wgrad reads (grad({out}), {inputs[0]}) -> grad(w)")
            lines.append(f"      impl default time {wgrad_time}us")
            lines.append(f"      impl into_grad time {wgrad_time + side.randint(0, 3)}us workspace {side.choice([0, 16])}B"
                         " accumulates (grad(w))")
        else:
            lines.append(f"    backward wgrad reads (grad({out}), {inputs[0]}) -> grad(w) time {wgrad_time}us")
    if not grads:
        if not use_param:
            lines.append(f"    backward reads (grad({out})) -> grad(x) time {rng.randint(1, 10)}us")
        return lines
    variants = [("from_input", f"{inputs[0]}"), ("from_output", out)]
    later = [o["out"] for o in ops if o["inputs"] and o["inputs"][0] == out and o["view_of"] is None]
    if later and rng.random() < 0.3:
        # an implementation that also reads the next gradient: gradient liveness then
        # depends on the implementation chosen
        variants.append(("with_next_grad", f"{inputs[0]}, grad({later[0]})"))
    if "mask" in chosen:
        variants.append(("from_mask", derived_mask))
    if "rng" in chosen:
        variants.append(("from_rng", derived_rng))
    rng.shuffle(variants)
    picked = variants[: rng.randint(1, min(3, len(variants)))]
    if "mask" in chosen and not any(v[1] == derived_mask for v in picked):
        picked.append(("from_mask", derived_mask))
    label = "dgrad" if use_param else ""
    head = f"    backward {label + ' ' if label else ''}reads (grad({out})) -> {', '.join(grads)}"
    if len(picked) == 1:
        ws = rng.choice([0, 64])
        lines.append(
            f"    backward {label + ' ' if label else ''}reads (grad({out}), {picked[0][1]}) -> {', '.join(grads)}"
            f" time {rng.randint(1, 10)}us" + (f" workspace {ws}B" if ws else "")
        )
        return lines
    lines.append(head)
    for vname, reads in picked:
        ws = rng.choice([0, 0, 64])
        lines.append(f"      impl {vname} reads ({reads}) time {rng.randint(1, 12)}us" + (f" workspace {ws}B" if ws else ""))
    return lines


def _elems(ops, tensor):
    for op in ops:
        if op["out"] == tensor:
            return op["elems"]
    return None


def _is_plain_storage(ops, tensor):
    for op in ops:
        if op["out"] == tensor:
            return op["view_of"] is None and not any(o["view_of"] == tensor for o in ops)
    return False


def random_spec(seed: int, **kwargs) -> Spec:
    """A valid random spec: the first valid draw from ``seed``, ``seed + 10**6``, ..."""
    for attempt in range(50):
        text = random_spec_text(seed + attempt * 10**6, **kwargs)
        try:
            spec = parse_spec(text, path=f"random-{seed}.monet")
            validate_spec(spec)
        except MonetError:
            continue
        return spec
    raise RuntimeError(f"no valid random spec from seed {seed}")  # pragma: no cover - generator bug


_RES_BLOCK = """\
  tensor {p}conv1.w f32[{c},{c},3,3] param
  tensor {p}bn1.w f32[{c}] param
  tensor {p}bn1.b f32[{c}] param
  tensor {p}conv2.w f32[{c},{c},3,3] param
  tensor {p}bn2.w f32[{c}] param
  tensor {p}bn2.b f32[{c}] param
  op {p}conv1 ({x}, {p}conv1.w) -> {p}c1 f32[{shape}] time 800us workspace 8MiB
    backward wgrad reads (grad({p}c1), {x}) -> grad({p}conv1.w) time 850us workspace 8MiB
    backward dgrad reads (grad({p}c1), {p}conv1.w) -> {dx} time 820us workspace 8MiB
  op {p}bn1 ({p}c1, {p}bn1.w, {p}bn1.b) -> {p}b1 f32[{shape}], {p}bn1.stats f32[2,{c}]
    impl default time 110us recompute time 75us
    backward reads (grad({p}b1), {p}bn1.w, {p}bn1.stats) -> grad({p}c1), grad({p}bn1.w), grad({p}bn1.b)
      impl from_input reads ({p}c1) time 180us
      impl from_output reads ({p}b1, {p}bn1.b) time 190us
  op {p}relu1 ({p}b1) -> {p}r1 f32[{shape}]
    impl plain time 70us
    impl inplace overwrites {p}b1 time 70us
    impl mask -> {p}r1.mask u1[{shape}] time 75us
    impl inplace_mask overwrites {p}b1 -> {p}r1.mask time 75us
    backward reads (grad({p}r1)) -> grad({p}b1)
      impl from_output reads ({p}r1) time 105us
      impl from_mask reads ({p}r1.mask) time 110us
  op {p}conv2 ({p}r1, {p}conv2.w) -> {p}c2 f32[{shape}] time 800us workspace 8MiB
    backward wgrad reads (grad({p}c2), {p}r1) -> grad({p}conv2.w) time 850us workspace 8MiB
    backward dgrad reads (grad({p}c2), {p}conv2.w) -> grad({p}r1) time 820us workspace 8MiB
  op {p}bn2 ({p}c2, {p}bn2.w, {p}bn2.b) -> {p}b2 f32[{shape}], {p}bn2.stats f32[2,{c}]
    impl default time 110us recompute time 75us
    backward reads (grad({p}b2), {p}bn2.w, {p}bn2.stats) -> grad({p}c2), grad({p}bn2.w), grad({p}bn2.b)
      impl from_input reads ({p}c2) time 180us
      impl from_output reads ({p}b2, {p}bn2.b) time 190us
  op {p}add ({p}b2, {x}) -> {p}s f32[{shape}]
    impl plain time 105us
    impl inplace overwrites {p}b2 time 105us
    backward reads (grad({p}s)) -> grad({p}b2){dskip} time 70us
  op {p}relu2 ({p}s) -> {p}y f32[{shape}]
    impl plain time 70us
    impl inplace overwrites {p}s time 70us
    impl mask -> {p}y.mask u1[{shape}] time 75us
    backward reads (grad({p}y)) -> grad({p}s)
      impl from_output reads ({p}y) time 105us
      impl from_mask reads ({p}y.mask) time 110us
"""


def resnet_stack(blocks: int, *, batch: int = 32, channels: int = 64, side: int = 56) -> str:
    """``blocks`` ResNet basic blocks in a chain (the shipped ``resblock`` repeated)."""
    shape = f"{batch},{channels},{side},{side}"
    lines = [f"network resnet{blocks}", f"  tensor x f32[{shape}] input"]
    x = "x"
    for b in range(blocks):
        p = f"b{b}."
        dx = f"grad({x})" if x != "x" else "grad(x)"
        dskip = f", grad({x})" if x != "x" else ""
        text = _RES_BLOCK.format(p=p, c=channels, shape=shape, x=x, dx=dx, dskip=dskip)
        if x == "x":  # the first block's input is fixed: its gradient is not needed
            text = "\n".join(l for l in text.splitlines() if "dgrad reads (grad(b0.c1)" not in l) + "\n"
        lines.append(text.rstrip("\n"))
        x = f"{p}y"
    lines.append(f"  output {x}")
    return "\n".join(lines) + "\n"


_TRANSFORMER_BLOCK = """\
  tensor {p}ln1.w f32[{d}] param
  tensor {p}ln1.b f32[{d}] param
  tensor {p}qkv.w f32[{d},{d3}] param
  tensor {p}proj.w f32[{d},{d}] param
  tensor {p}ln2.w f32[{d}] param
  tensor {p}ln2.b f32[{d}] param
  tensor {p}fc.w f32[{d},{d4}] param
  tensor {p}out.w f32[{d4},{d}] param
  op {p}ln1 ({x}, {p}ln1.w, {p}ln1.b) -> {p}h1 f32[{bsd}], {p}ln1.stats f32[{bs},2] time 20us
    backward reads (grad({p}h1), {p}ln1.w, {p}ln1.stats) -> {dx_ln1}grad({p}ln1.w), grad({p}ln1.b)
      impl from_input reads ({x}) time 40us
      impl from_output reads ({p}h1, {p}ln1.b) time 45us
  op {p}qkv ({p}h1, {p}qkv.w) -> {p}qkv f32[{bsd3}] time 745us
    backward wgrad reads (grad({p}qkv), {p}h1) -> grad({p}qkv.w) time 745us
    backward dgrad reads (grad({p}qkv), {p}qkv.w) -> grad({p}h1) time 745us
  op {p}split ({p}qkv) -> {p}q f32[{bhsd}] view of {p}qkv, {p}k f32[{bhsd}] view of {p}qkv, {p}v f32[{bhsd}] view of {p}qkv time 0us
    backward reads (grad({p}q), grad({p}k), grad({p}v)) -> grad({p}qkv) time 25us
  op {p}sdpa ({p}q, {p}k, {p}v) -> {p}o f32[{bhsd}]
    impl flash -> {p}lse f32[{bhs}] time 330us
    impl math -> {p}probs f32[{bhss}] time 420us workspace 96MiB
    backward reads (grad({p}o), {p}q, {p}k, {p}v) -> grad({p}q), grad({p}k), grad({p}v)
      impl flash reads ({p}o, {p}lse) time 830us
      impl math reads ({p}probs) time 660us workspace 96MiB
  op {p}merge ({p}o) -> {p}m f32[{bsd}] time 20us
    backward reads (grad({p}m)) -> grad({p}o) time 20us
  op {p}proj ({p}m, {p}proj.w) -> {p}p f32[{bsd}] time 250us
    backward wgrad reads (grad({p}p), {p}m) -> grad({p}proj.w) time 250us
    backward dgrad reads (grad({p}p), {p}proj.w) -> grad({p}m) time 250us
  op {p}drop1 ({p}p) -> {p}d1 f32[{bsd}]
    impl bool_mask -> {p}drop1.mask bool[{bsd}], {p}drop1.rng u8[16] time 22us recompute reads ({p}drop1.rng)
    impl bit_mask -> {p}drop1.bits u1[{bsd}], {p}drop1.rng time 24us recompute reads ({p}drop1.rng)
    impl rng_replay -> {p}drop1.rng time 20us recompute reads ({p}drop1.rng)
    backward reads (grad({p}d1)) -> grad({p}p)
      impl from_mask reads ({p}drop1.mask) time 20us
      impl from_bits reads ({p}drop1.bits) time 22us
      impl from_rng reads ({p}drop1.rng) time 30us
  op {p}res1 ({x}, {p}d1) -> {p}r1 f32[{bsd}] time 25us
    backward reads (grad({p}r1)) -> {dx_res1}grad({p}d1) time 15us
  op {p}ln2 ({p}r1, {p}ln2.w, {p}ln2.b) -> {p}h2 f32[{bsd}], {p}ln2.stats f32[{bs},2] time 20us
    backward reads (grad({p}h2), {p}ln2.w, {p}ln2.stats) -> grad({p}r1), grad({p}ln2.w), grad({p}ln2.b)
      impl from_input reads ({p}r1) time 40us
      impl from_output reads ({p}h2, {p}ln2.b) time 45us
  op {p}fc ({p}h2, {p}fc.w) -> {p}f f32[{bsd4}] time 990us
    backward wgrad reads (grad({p}f), {p}h2) -> grad({p}fc.w) time 990us
    backward dgrad reads (grad({p}f), {p}fc.w) -> grad({p}h2) time 990us
  op {p}gelu ({p}f) -> {p}g f32[{bsd4}] time 65us
    backward reads (grad({p}g), {p}f) -> grad({p}f) time 100us
  op {p}out ({p}g, {p}out.w) -> {p}pj f32[{bsd}] time 990us
    backward wgrad reads (grad({p}pj), {p}g) -> grad({p}out.w) time 990us
    backward dgrad reads (grad({p}pj), {p}out.w) -> grad({p}g) time 990us
  op {p}drop2 ({p}pj) -> {p}d2 f32[{bsd}]
    impl bool_mask -> {p}drop2.mask bool[{bsd}], {p}drop2.rng u8[16] time 22us recompute reads ({p}drop2.rng)
    impl bit_mask -> {p}drop2.bits u1[{bsd}], {p}drop2.rng time 24us recompute reads ({p}drop2.rng)
    impl rng_replay -> {p}drop2.rng time 20us recompute reads ({p}drop2.rng)
    backward reads (grad({p}d2)) -> grad({p}pj)
      impl from_mask reads ({p}drop2.mask) time 20us
      impl from_bits reads ({p}drop2.bits) time 22us
      impl from_rng reads ({p}drop2.rng) time 30us
  op {p}res2 ({p}r1, {p}d2) -> {p}y f32[{bsd}] time 25us
    backward reads (grad({p}y)) -> grad({p}r1), grad({p}d2) time 15us
"""


def transformer_stack(layers: int, *, batch: int = 8, seq: int = 512, width: int = 768, heads: int = 12) -> str:
    """``layers`` pre-LayerNorm transformer blocks (the shipped one repeated)."""
    hd = width // heads
    dims = dict(
        d=width, d3=3 * width, d4=4 * width, bs=f"{batch},{seq}", bsd=f"{batch},{seq},{width}",
        bsd3=f"{batch},{seq},{3 * width}", bsd4=f"{batch},{seq},{4 * width}", bhsd=f"{batch},{heads},{seq},{hd}",
        bhs=f"{batch},{heads},{seq}", bhss=f"{batch},{heads},{seq},{seq}",
    )
    lines = [f"network transformer{layers}", f"  tensor x f32[{batch},{seq},{width}] input"]
    x = "x"
    for layer in range(layers):
        p = f"l{layer}."
        first = x == "x"
        text = _TRANSFORMER_BLOCK.format(
            p=p, x=x, dx_ln1="" if first else f"grad({x}), ", dx_res1="" if first else f"grad({x}), ", **dims
        )
        lines.append(text.rstrip("\n"))
        x = f"{p}y"
    lines.append(f"  output {x}")
    return "\n".join(lines) + "\n"


def layered_training_graph(n_forward: int, seed: int) -> dict:
    """Node-link data of a seeded layered DAG of ``n_forward`` forward nodes (each reads
    one or two earlier ones) plus its backward graph: the backward node of ``f_i`` reads
    ``f_i``, its inputs and the gradients of its users, as Checkmate derives it. Costs and
    sizes are small integers; ``2 * n_forward`` nodes in all."""
    import networkx as nx

    rng = random.Random(seed)
    graph = nx.DiGraph()
    for i in range(n_forward):
        graph.add_node(i, name=f"f{i}", backward=False, cost_cpu=rng.randint(0, 20), cost_ram=rng.randint(1, 64) * 16)
        for j in rng.sample(range(i), k=min(i, rng.randint(1, 2))):
            graph.add_edge(j, i)
    for i in reversed(range(n_forward)):
        b = 2 * n_forward - 1 - i
        graph.add_node(b, name=f"b{i}", backward=True, cost_cpu=rng.randint(0, 40), cost_ram=graph.nodes[i]["cost_ram"])
        graph.add_edge(i, b)
        for j in list(graph.predecessors(i)):
            if not graph.nodes[j]["backward"]:
                graph.add_edge(j, b)
        for user in [u for u in graph.successors(i) if not graph.nodes[u]["backward"]]:
            graph.add_edge(2 * n_forward - 1 - user, b)
    return nx.node_link_data(graph, edges="links")


def layered_spec(n_forward: int, seed: int) -> Spec:
    """:func:`layered_training_graph` imported as a spec (``2 * n_forward`` nodes)."""
    from .importers import network_from_node_link

    name = f"layered{2 * n_forward}_seed{seed}"
    return Spec(network_from_node_link(layered_training_graph(n_forward, seed), name=name), path=f"{name}.monet")
