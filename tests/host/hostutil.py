"""Helpers shared by the host tests (importable as ``hostutil``; pytest puts tests/host on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMFY = os.environ.get("COMFYUI_PATH")
SKIP_REASON = ("COMFYUI_PATH is not set: the host tests need a ComfyUI checkout "
               "(COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/host -m host; see docs/comfyui.md)")

OFFICIAL_TO_FIXTURE = {
    "512_text.ckpt": "tiny_text.ckpt",
    "512_mask.ckpt": "tiny_mask.ckpt",
    "512_vae.ckpt": "tiny_vae.ckpt",
    "512_codiff_mask_text.ckpt": "tiny_codiff_mask_text.ckpt",
}


def reference_dir() -> Path:
    env = os.environ.get("CODIFF_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "fixtures" / "reference"


class NullServer:
    """What PromptExecutor needs from a server, recording the messages it sends."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def make_executor(execution, server):
    """A PromptExecutor built the way the running host's ``main.py`` builds one with ``--cache-classic``.

    Its constructor changed over the versions (``cache_size`` up to 0.3.64, then a ``cache_args`` dict read by
    ``execute_async``: ``lru`` and ``ram``, and ``ram_inactive`` since 0.29), so the arguments follow the
    constructor's own parameters, never a version number."""
    import inspect

    params = inspect.signature(execution.PromptExecutor).parameters
    kwargs = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in params:
        kwargs["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    elif "cache_size" in params:
        kwargs["cache_size"] = None
    return execution.PromptExecutor(server, **kwargs)


def cached_output(executor, node_id: str):
    """A node's outputs from the executor's cache: ``get_local`` where the cache's ``get`` became a coroutine
    (0.29), else the synchronous ``get``; unwrapped from the cache's entry type where it has one."""
    import asyncio

    cache = executor.caches.outputs
    getter = getattr(cache, "get_local", None) or cache.get
    value = getter(node_id)
    if asyncio.iscoroutine(value):
        value = asyncio.run(value)
    # since 0.3.75 the cache holds a CacheEntry(ui, outputs) instead of the bare outputs
    return getattr(value, "outputs", value)


def write_mask_png(path: Path, labels) -> Path:
    """An indexed PNG in the CelebAMask-HQ palette (the reference's mask format) from a label array."""
    import numpy as np
    from PIL import Image

    from collab_core.masks import celebamask_palette  # noqa: E402  (repo root is on sys.path under pytest)

    img = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L").convert("P")
    img.putpalette(celebamask_palette())
    img.save(path)
    return path


def combo_options(entry) -> list:
    """The choices of a combo input in the host's V1 input description: ``["COMBO", {"options": [...]}]`` for a
    V3 node, ``[[...], {...}]`` for a V1 one."""
    return list(entry[1]["options"]) if entry[0] == "COMBO" else list(entry[0])


def pack_module(relative: str):
    """The pack's module from ``relative`` (e.g. ``"nodes/attention.py"``) as the host loaded it (under its custom
    node package name, never re-imported)."""
    import sys

    want = REPO / relative
    return next(m for m in list(sys.modules.values())
                if getattr(m, "__file__", None) and Path(m.__file__).resolve() == want)


def node(host_ns, class_type: str):
    """An instance of a registered node class (fetched from the host registry, never re-imported)."""
    return host_ns.mappings[class_type]()


def call(host_ns, class_type: str, **kwargs):
    """Run one node's function directly, under inference mode as the executor does."""
    import torch

    obj = node(host_ns, class_type)
    with torch.inference_mode():
        out = getattr(obj, obj.FUNCTION)(**kwargs)
    return tuple(out.args) if hasattr(out, "args") else out  # a V3 node returns a NodeOutput
