"""The runtime: train a PyTorch model with a schedule.

``monetdsl.optimize(model, example_inputs, budget=...)`` returns a module that trains
with a schedule (forward keeping exactly what the schedule keeps, backward stage by
stage with its recomputations and chosen implementations, every tensor freed after
its last use); ``torch.compile(model, backend=monetdsl.backend(...))`` does the same
for code already on torch.compile; ``monetdsl.measure`` compares the measured peak
memory of training steps with the planned one.

Import cost: torch (numba is imported when a CUDA kernel first runs).
"""
from .api import backend, optimize
from .host_malloc import MallocSettings, retain_freed_memory
from .memory import MeasuredStep, measure
from .module import OptimizedModule, RuntimeUsageError
from ..planning import Constraints
from .plan import RuntimePlan

__all__ = ["optimize", "backend", "measure", "MeasuredStep", "OptimizedModule", "RuntimePlan", "Constraints", "RuntimeUsageError",
           "retain_freed_memory", "MallocSettings"]
