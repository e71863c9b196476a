"""ComfyUI adapters: host types in, ``collab_core`` calls, host types out.

One module per feature (``nodes_loaders``, ``nodes_conditioning``, ``nodes_collaborative``, ``nodes_freeu``,
``nodes_editing``, ``nodes_face``), each listing its V3 node classes in ``NODES``; ``schema`` is the one module that imports the
host's node API. The host-free helpers the nodes share sit in modules named for their job (``errors``, ``labels``,
``branches``, ``conditioning``, ``freeu``) and import anywhere (``tests/test_nodes_pure.py``); the node modules
import ComfyUI, so they are only imported when ComfyUI is present.
"""

import importlib
import importlib.util
import logging

#: Feature modules, in menu order. The first four are the pack's core; a later one that fails to import is
#: logged with its traceback and skipped, so the others still register.
FEATURES = ("nodes_loaders", "nodes_conditioning", "nodes_collaborative", "nodes_freeu", "nodes_editing",
            "nodes_face")
_CORE = 4


def node_classes() -> list:
    """Every node class of the pack (V3 ``io.ComfyNode`` subclasses), registering the model folders first."""
    from . import host

    host.register_folders()
    found = []
    for i, name in enumerate(FEATURES):
        try:
            module = importlib.import_module(f".{name}", __name__)
        except Exception:
            if i < _CORE:
                raise
            logging.getLogger("collaborative_diffusion").exception("collaborative_diffusion: %s failed to import; "
                                                                   "its nodes are unavailable", name)
            continue
        found.extend(module.NODES)
    return found


def host_present() -> bool:
    return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None


async def comfy_entrypoint():
    """The host's V3 entry point: the pack as one ``ComfyExtension``."""
    from .schema import CollabExtension

    return CollabExtension(node_classes())
