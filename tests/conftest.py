import os
from pathlib import Path

import pytest

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
