"""The markers mean what they say: ``parity`` = needs the golden data, and nothing else carries it."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from reference_set import GOLDEN_FIXTURES

HERE = Path(__file__).resolve().parent


def test_every_collected_test_that_needs_golden_data_is_marked_parity(request):
    items = request.session.items
    assert items
    unmarked = [i.nodeid for i in items if set(GOLDEN_FIXTURES) & set(i.fixturenames) and not i.get_closest_marker("parity")]
    assert unmarked == []
    wrongly = [i.nodeid for i in items if i.get_closest_marker("parity") and not set(GOLDEN_FIXTURES) & set(i.fixturenames)]
    assert wrongly == []


def _collect(tmp_path, body: str):
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    for f in ("conftest.py", "reference_set.py"):
        shutil.copy(HERE / f, tests / f)
    (tests / "test_x.py").write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "parity", "-p", "no:cacheprovider",
                           str(tests)], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_collection_marks_golden_data_users_and_refuses_a_parity_mark_without_them(tmp_path):
    ok = _collect(tmp_path, """
        import pytest

        @pytest.fixture
        def through_another_fixture(ref_dir):
            return ref_dir

        def test_direct(ref_dir): pass
        def test_indirect(through_another_fixture): pass
        def test_manifest(ref): pass
        def test_none(): pass
    """)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "test_direct" in ok.stdout and "test_indirect" in ok.stdout and "test_manifest" in ok.stdout
    assert "test_none" not in ok.stdout and "3/4 tests collected" in ok.stdout
    bad = _collect(tmp_path, """
        import pytest

        @pytest.mark.parity
        def test_needs_nothing(): pass
    """)
    assert bad.returncode != 0
    assert "test_needs_nothing" in bad.stdout + bad.stderr and "marked parity but uses no golden data" in bad.stdout + bad.stderr
