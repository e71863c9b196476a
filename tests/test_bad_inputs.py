"""Every bad input of the table in ``bad_inputs.py`` gets one clear error before any work, and nothing is written.

The cases run in-process (a case that got past the checks would load the demo models and sample 2 steps, so a
regression shows as a failure here, not as a hang). Each asserts: the verdict (``clear`` = exit 2 or a
``CollabError``, no traceback, nothing written, no input changed), and that the message names the argument.
"""

from __future__ import annotations

import pytest

from bad_inputs import CASES, DEMO, Workspace, run_case


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module")
def pipe():
    if not (DEMO / "demo_codiff_mask_text.safetensors").is_file():
        pytest.skip("the demo bundle is not built")
    from collab_core import load_pipeline

    return load_pipeline()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_error_before_any_work(case, ws, pipe, tmp_path, monkeypatch):
    missing = [n for n in case.needs if not (ws.root / n).is_file()]
    if missing:
        pytest.skip(f"needs {missing} (made from the demo bundle)")
    monkeypatch.chdir(tmp_path)  # a case that writes to a default place writes here
    out = tmp_path / "out"
    got = run_case(case, ws, out, pipe)
    assert got.verdict == case.expect, (got.verdict, got.code, got.message[-2000:], got.written)
    if case.expect == "clear":
        assert case.say.lower() in got.message.lower(), got.message
        assert not out.exists(), "a refused run created its output folder"
