"""ComfyUI entry point of the Collaborative Diffusion pack.

ComfyUI imports this file as a package and reads NODE_CLASS_MAPPINGS. Outside ComfyUI (plain Python,
tests, the command line) there is no host to register with, so the mappings stay empty and nothing fails;
the method itself lives in the host-free ``collab_core`` package.
"""

import importlib.util

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = None

if __package__ and importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
