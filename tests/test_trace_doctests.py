"""The examples in the docstrings of the catalogue and tracer modules run."""
import doctest
import importlib

import pytest

MODULES = ["monetdsl.catalogue", "monetdsl.catalogue.packing", "monetdsl.catalogue.loss", "monetdsl.tracing.naming",
           "monetdsl.costs.estimated_workspace", "monetdsl.lowering.step_source",
           "monetdsl.runtime.eager_reference"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
