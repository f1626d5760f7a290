"""pytest setup shared by the tests and the docstring examples of dlfs.py."""

import numpy as np
import pytest

import dlfs


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    """The names dlfs.py's examples assume, as its module docstring says:
    ``import numpy as np`` and ``import dlfs``."""
    doctest_namespace["np"] = np
    doctest_namespace["dlfs"] = dlfs
