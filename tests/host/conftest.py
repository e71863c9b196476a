"""Host tests: run the node pack inside a real ComfyUI checkout named by $COMFYUI_PATH.

Without $COMFYUI_PATH every test here is skipped with a visible reason. With it, one ComfyUI is initialised
in-process per session (about 5 s) and the pack is loaded from this repository the way ComfyUI loads any
custom node folder; ``test_server.py`` also starts a real server on loopback.

Run:  COMFYUI_PATH=/path/to/ComfyUI <comfy venv>/bin/python -m pytest tests/host -m host -q
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from hostutil import (COMFY, REPO, SKIP_REASON, NullServer, cached_output, make_executor, reference_dir,  # noqa: F401
                      write_mask_png)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.host)
            if not COMFY:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    d = reference_dir()
    if not (d / "manifest.json").is_file():
        pytest.skip(f"reference fixtures not found at {d} (set CODIFF_REFERENCE_DIR)")
    return d


@pytest.fixture(scope="session")
def host(fixture_dir):
    """ComfyUI in-process with the pack loaded; the fixture checkpoints in models/collaborative_diffusion."""
    if not COMFY:
        pytest.skip(SKIP_REASON)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.path.insert(0, COMFY)
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (device state is decided at import)
    import utils.extra_config  # noqa: F401  (before `nodes`: ComfyUI's utils package vs comfy/utils.py)
    import folder_paths

    base = Path(tempfile.mkdtemp(prefix="collab-host-"))
    for sub in ("output", "temp", "input", "user"):
        (base / sub).mkdir()
        getattr(folder_paths, f"set_{sub}_directory")(str(base / sub))
    folder_paths.add_model_folder_path("collaborative_diffusion", str(fixture_dir / "pretrained"))
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(REPO), ignore=before, module_parent="custom_nodes"))
    assert ok, "the pack failed to import into ComfyUI (see the log above)"
    pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)

    import torch
    from safetensors.torch import load_file

    # Tiny models on a shared CPU: one thread avoids thread hand-over costs that dominate tiny ops.
    torch.set_num_threads(int(os.environ.get("COLLAB_TEST_THREADS", "1")))
    inputs = load_file(str(fixture_dir / "inputs.safetensors"))
    mask_name = "fixture_mask_27007_32px.png"
    write_mask_png(base / "input" / mask_name, inputs["mask_label_32"].numpy())
    example = REPO / "workflows" / "face_mask_example.png"
    if example.is_file():
        shutil.copy(example, base / "input" / example.name)

    def run(prompt: dict, server: NullServer | None = None, extra_data: dict | None = None):
        server = server or NullServer()
        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            return SimpleNamespace(valid=False, error=valid[1], node_errors=valid[3], success=False, outputs={},
                                   messages=[], executor=None)
        ex = make_executor(execution, server)
        with torch.inference_mode():
            ex.execute(prompt, pid, dict(extra_data or {}), valid[2])
        outs = {k: cached_output(ex, k) for k in prompt}
        return SimpleNamespace(valid=True, error=None, node_errors={}, success=ex.success, outputs=outs,
                               messages=ex.status_messages, executor=ex, server=server)

    ns = SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, base=base,
                         mappings=nodes.NODE_CLASS_MAPPINGS, pack_nodes=pack_nodes, run=run, inputs=inputs,
                         mask_name=mask_name, fixture_dir=fixture_dir)
    yield ns
    shutil.rmtree(base, ignore_errors=True)
