"""ComfyUI entry point of the Collaborative Diffusion pack.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (the V3 node API), which returns the
pack's nodes. Outside ComfyUI (plain Python, tests, the command line) there is no host: nothing is imported
from ``nodes`` and nothing fails; the method itself lives in the host-free ``collab_core`` package.
"""

import importlib.util

WEB_DIRECTORY = None

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint"]
