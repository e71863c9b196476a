"""Shared fixtures and the meaning of the markers.

* ``parity``: the test needs golden data of the reference implementation (the ``ref_dir``/``ref`` fixtures, or the
  host tests' ``fixture_dir``). Every test that asks for one of those fixtures gets the marker here, and a test
  marked ``parity`` that asks for none of them is a collection error: the marker means "needs golden data".
* ``slow``: more than about 4 s on the 2-core test machine; ``-m "not slow"`` is the quick selection.
"""

import os
from pathlib import Path

import pytest

from reference_set import GOLDEN_FIXTURES, ReferenceSet, reference_set

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    """The golden-data directory: $CODIFF_REFERENCE_DIR, else ../shared/fixtures/reference."""
    env = os.environ.get("CODIFF_REFERENCE_DIR")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    d = reference_dir()
    if not (d / "manifest.json").is_file():
        pytest.skip(
            f"reference fixtures not found at {d} (set CODIFF_REFERENCE_DIR to a directory holding manifest.json)"
        )
    return d


@pytest.fixture(scope="session")
def ref(ref_dir) -> ReferenceSet:
    """The golden set, read from its manifest (tests/reference_set.py)."""
    return reference_set(ref_dir)


def parity_problems(items) -> list[str]:
    """Mark every test that needs golden data ``parity``; return the tests marked ``parity`` that need none."""
    problems = []
    for item in items:
        needs = any(f in GOLDEN_FIXTURES for f in getattr(item, "fixturenames", ()))
        marked = item.get_closest_marker("parity") is not None
        if needs and not marked:
            item.add_marker(pytest.mark.parity)
        elif marked and not needs:
            problems.append(item.nodeid)
    return problems


def pytest_collection_modifyitems(config, items):
    problems = parity_problems(items)
    if problems:
        raise pytest.UsageError(
            "marked parity but uses no golden data (none of the fixtures " + ", ".join(GOLDEN_FIXTURES) + "): "
            + ", ".join(problems) + " -- drop the marker or take the fixture"
        )
