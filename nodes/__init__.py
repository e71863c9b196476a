"""ComfyUI adapters: host types in, ``collab_core`` calls, host types out. Imported only inside ComfyUI."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
