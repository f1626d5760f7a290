"""pytest setup shared by the tests and the docstring examples of dlfs.py."""

import numpy as np
import pytest

import dlfs


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    """The names dlfs.py's examples assume, as its module docstring says
    (``import numpy as np``, ``import dlfs``), and ``__name__`` of a user's
    script: without it a class an example defines would claim to come from
    dlfs itself (its ``__module__``), which dlfs takes for one of its own."""
    doctest_namespace["np"] = np
    doctest_namespace["dlfs"] = dlfs
    doctest_namespace["__name__"] = "__main__"
