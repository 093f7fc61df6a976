"""Batch-sliced segments: chains of per-sample ops run slice by slice of the batch.

:mod:`.runs` finds the chains a spec allows; :mod:`.segment` turns chosen chains into
single ops whose implementations ``slicedK`` carry the exact memory and time of running
them in ``K`` slices (the one place that defines them); :mod:`.choice` picks the segments
that lower a network's floor. The runtime form is :mod:`monetdsl.runtime.sliced_segment`.
"""
from .choice import DEFAULT_ALLOWANCE, op_by_op_bound, widest_blocks, with_widest_segments
from .runs import Run, block_width, blocks, per_sample_runs
from .segment import (DEFAULT_KERNEL_FEE_US, DEFAULT_SLICES, SegmentCosts, is_segment, offered_costs, segment_costs, segment_members,
                      segment_name, slice_count,
                      sliced_network, sliced_spec)

__all__ = ["Run", "block_width", "blocks", "per_sample_runs", "widest_blocks", "with_widest_segments", "op_by_op_bound", "DEFAULT_ALLOWANCE", "DEFAULT_KERNEL_FEE_US", "DEFAULT_SLICES",
           "SegmentCosts", "is_segment", "offered_costs", "segment_costs", "segment_members", "segment_name", "slice_count", "sliced_network", "sliced_spec"]
