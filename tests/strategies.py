"""Hypothesis strategies: random but valid networks and constraints.

The generated networks use every feature of the language: fixed tensors and fixed items,
shaped and sized tensors, views, several outputs, implementations that overwrite an input
or produce derived tensors, recompute times and reads, backward ops attached to forward
ops with several implementations, top-level (plain DAG) backward ops with named gradient
outputs, and names that need quoting. They are built in canonical order (attached backward
ops first, top-level ones last), so parse(print(net)) must equal net exactly.
"""
from __future__ import annotations

from hypothesis import strategies as st

from monetdsl.ir import (
    BackwardImpl,
    BackwardOp,
    Constraints,
    FixedItem,
    ForwardImpl,
    ForwardOp,
    ImplPin,
    Network,
    Pattern,
    Tensor,
    TensorKind,
    grad_name,
    shape_bytes,
)

_PLAIN = st.from_regex(r"[a-z][a-z0-9_]{0,5}(\.[a-z0-9_]{1,3}){0,2}", fullmatch=True)
_ODD = st.sampled_from(["time", "keep", "grad", "my op", "layer-1", "x/y", 'q"t', "naïve", "0start", "a\\b"])
NAMES = st.one_of(_PLAIN, _PLAIN, _PLAIN, _ODD)
TIMES = st.one_of(
    st.integers(0, 5000).map(float),
    st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
DTYPES = st.sampled_from(["f32", "f16", "bf16", "i64", "u8", "bool", "u1", "u4"])
SHAPES = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def tensor_type(draw, name: str, kind: TensorKind) -> Tensor:
    if draw(st.booleans()):
        dtype, shape = draw(DTYPES), draw(SHAPES)
        return Tensor(name, kind, shape_bytes(dtype, shape), dtype, shape)
    return Tensor(name, kind, draw(st.integers(1, 1 << 22)))


@st.composite
def networks(draw, max_ops: int = 6) -> Network:
    used: set[str] = set()

    def fresh(prefix: str) -> str:
        while True:
            base = draw(NAMES)
            name = base if draw(st.booleans()) else f"{prefix}{len(used)}"
            if name not in used and not name.startswith("grad("):
                used.add(name)
                return name

    tensors: dict[str, Tensor] = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from([TensorKind.INPUT, TensorKind.PARAM, TensorKind.BUFFER]))
        t = draw(tensor_type(fresh("w"), kind))
        tensors[t.name] = t
    fixed = tuple(FixedItem(fresh("fx"), draw(st.integers(0, 1 << 30))) for _ in range(draw(st.integers(0, 2))))

    forward: list[ForwardOp] = []
    activations: list[str] = []  # main outputs, not views
    readable: list[str] = list(tensors)
    overwritten: set[str] = set()  # an in-place victim may have no later reader
    derived_of: dict[str, list[str]] = {}
    for _ in range(draw(st.integers(1, max_ops))):
        choices = [r for r in readable if r not in overwritten]
        inputs = tuple(dict.fromkeys(draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3))))
        outputs = []
        for k in range(draw(st.integers(1, 2))):
            name = fresh("t")
            view_base = [i for i in inputs if i in activations or tensors[i].is_fixed]
            if k > 0 and view_base and draw(st.booleans()):
                base = draw(st.sampled_from(view_base))
                t = Tensor(name, TensorKind.ACTIVATION, tensors[base].nbytes, tensors[base].dtype, tensors[base].shape, base)
            else:
                t = draw(tensor_type(name, TensorKind.ACTIVATION))
            tensors[name] = t
            outputs.append(name)
        impls = []
        impl_names = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
        if len(impl_names) == 1 and draw(st.booleans()):
            impl_names = ["default"]
        derived_pool: list[str] = []
        for impl_name in impl_names:
            overwrites = None
            first = tensors[outputs[0]]
            victims = [
                i for i in inputs
                if i in activations and tensors[i].view_of is None and tensors[i].storage_bytes >= first.nbytes
            ]
            # an op's first implementation is out of place, so every network has a no-recompute schedule
            if impls and first.view_of is None and victims and draw(st.integers(0, 3)) == 0:
                overwrites = draw(st.sampled_from(victims))
                overwritten.add(overwrites)
            derived = []
            if impl_name != "default" and draw(st.booleans()):
                if derived_pool and draw(st.booleans()):
                    derived.append(draw(st.sampled_from(derived_pool)))
                else:
                    t = draw(tensor_type(fresh("d"), TensorKind.ACTIVATION))
                    tensors[t.name] = t
                    derived_pool.append(t.name)
                    derived.append(t.name)
            recompute_time = draw(st.one_of(st.none(), TIMES))
            recompute_reads = frozenset(draw(st.lists(st.sampled_from(derived or readable), max_size=1)))
            impls.append(
                ForwardImpl(
                    impl_name,
                    draw(TIMES),
                    draw(st.integers(0, 1 << 24)),
                    overwrites,
                    tuple(derived),
                    recompute_time,
                    recompute_reads,
                )
            )
        forward.append(ForwardOp(fresh("op"), inputs, tuple(outputs), tuple(impls)))
        derived_of[forward[-1].name] = derived_pool
        activations.extend(o for o in outputs if tensors[o].view_of is None)
        readable.extend(outputs)

    def grad(name: str) -> str:
        g = grad_name(name)
        if g not in tensors:
            base = tensors[name]
            tensors[g] = Tensor(g, TensorKind.GRADIENT, base.nbytes, base.dtype, base.shape, None, name)
        return g

    last = forward[-1].outputs[0]
    outputs = (last,)
    backward: list[BackwardOp] = []
    forward_tensors = [t for t in tensors if tensors[t].kind is TensorKind.ACTIVATION]
    all_derived = {d for pool in derived_of.values() for d in pool}
    for op in forward:
        # an op's backward reads derived tensors of that op only (masks, statistics): what real specs do
        readable_here = [t for t in forward_tensors if t not in all_derived or t in derived_of[op.name]]
        for local in draw(st.lists(st.sampled_from(["backward", "dgrad", "wgrad", "time"]), max_size=2, unique=True)):
            available_grads = [g for g in tensors if tensors[g].grad_of is not None] or [grad_name(last)]
            outs = tuple(dict.fromkeys(grad(i) for i in op.inputs if not tensors[i].is_fixed or draw(st.booleans())))
            if not outs:
                outs = (grad(op.inputs[0]),)
            impls = []
            for impl_name in draw(st.lists(NAMES, min_size=1, max_size=2, unique=True)):
                reads = frozenset(
                    draw(st.lists(st.sampled_from(available_grads + readable_here), max_size=3))
                )
                for name in reads:
                    if name.startswith("grad(") and name not in tensors:
                        grad(last)  # the seed, created when first read
                impls.append(BackwardImpl(impl_name, reads, draw(TIMES), draw(st.integers(0, 1 << 20))))
            backward.append(BackwardOp(f"{op.name}.{local}", outs, tuple(impls), op.name))
    for _ in range(draw(st.integers(0, 2))):
        out = draw(tensor_type(fresh("g"), TensorKind.GRADIENT))
        tensors[out.name] = out
        main_tensors = [t for t in forward_tensors if t not in all_derived]
        reads = frozenset(draw(st.lists(st.sampled_from(main_tensors), max_size=2)))
        name = fresh("bw")
        backward.append(BackwardOp(name, (out.name,), (BackwardImpl("default", reads, draw(TIMES)),)))
    return Network(draw(NAMES), tensors, tuple(forward), tuple(backward), outputs, fixed)


@st.composite
def constraints(draw) -> Constraints:
    patterns = st.lists(st.builds(Pattern, st.from_regex(r"[a-z][a-z0-9_.*?]{0,6}", fullmatch=True)), max_size=2).map(tuple)
    pins = st.lists(
        st.builds(
            ImplPin,
            st.builds(Pattern, st.from_regex(r"[a-z][a-z0-9_.*]{0,6}", fullmatch=True)),
            st.lists(_PLAIN, min_size=1, max_size=3, unique=True).map(tuple),
        ),
        max_size=2,
    ).map(tuple)
    return Constraints(
        draw(st.one_of(st.none(), st.integers(1, 1 << 40))),
        draw(st.one_of(st.none(), st.floats(0, 5, allow_nan=False))),
        draw(patterns),
        draw(patterns),
        draw(pins),
    )
