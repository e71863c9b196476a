"""ComfyUI adapters: host types in, ``collab_core`` calls, host types out.

One module per feature (``nodes_loaders``, ``nodes_conditioning``, ``nodes_collaborative``, ``nodes_freeu``,
``nodes_editing``); ``adapters`` holds the host-free pure functions they share. The node modules import ComfyUI,
so they are only imported when ComfyUI is present; ``adapters`` imports anywhere.
"""

import importlib
import importlib.util
import logging

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

#: Feature modules, in menu order. The first four are the pack's core; a later one that fails to import is
#: logged with its traceback and skipped, so the others still register.
FEATURES = ("nodes_loaders", "nodes_conditioning", "nodes_collaborative", "nodes_freeu", "nodes_editing")
_CORE = 4

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from . import host as _host

    _host.register_folders()

    for _i, _name in enumerate(FEATURES):
        if _i >= _CORE and importlib.util.find_spec(f"{__name__}.{_name}") is None:
            continue
        try:
            _mod = importlib.import_module(f".{_name}", __name__)
        except Exception:
            if _i < _CORE:
                raise
            logging.getLogger("collaborative_diffusion").exception("collaborative_diffusion: %s failed to import; "
                                                                   "its nodes are unavailable", _name)
            continue
        NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
