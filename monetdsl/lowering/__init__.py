"""Lowering: every traced op, with one of its implementations, as a callable step.

Between tracing and costing: the costing stage times and measures exactly these steps,
and the runtime's executor runs them. :mod:`.program` builds the steps, :mod:`.graphs`
rebuilds arguments from their storage owners and traces local backward graphs,
:mod:`.alternatives` runs the catalogue's other implementations through the custom ops of
:mod:`.ops` (numba kernels of :mod:`.kernels` on CUDA).
"""
