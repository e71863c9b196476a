"""The pack's one door to the host's V3 node schema (``comfy_api.latest``), and its one error convention.

Every node is a ``CollabNode``: an ``io.ComfyNode`` whose ``define_schema`` states its inputs (each with a
tooltip) and outputs, and whose work is the classmethod ``run``. ``execute`` — the host's entry point — calls
``run`` and turns any error of the core (``CollabError``) into a ``CollabNodeError`` that names the node, so the
host shows "[node] what is wrong and the fix" instead of a traceback; node code raises and never wraps.
"""

from __future__ import annotations

import math

from comfy_api.latest import ComfyExtension, io

from ..collab_core.errors import CollabError
from .errors import CollabNodeError, node_error

#: Node category in the host's "Add Node" menu.
CATEGORY = "collaborative_diffusion"

# The pack's own socket types (plain strings on the wire, so saved workflows keep connecting).
Branches = io.Custom("COLLAB_BRANCHES")
Encoder = io.Custom("COLLAB_ENCODER")
Diffuser = io.Custom("DYNAMIC_DIFFUSER")
Inversion = io.Custom("COLLAB_INVERSION")

SEED_MAX = 0xFFFFFFFFFFFFFFFF


class CollabNode(io.ComfyNode):
    """Base of the pack's nodes: ``NODE_ID`` and ``NAME`` (the display name), a schema, and ``run``."""

    NODE_ID = ""
    NAME = ""

    @classmethod
    def schema(cls, inputs: list, outputs: list, *, category: str = CATEGORY, **flags) -> io.Schema:
        """The node's schema with the pack's conventions: id, display name, category, the class docstring."""
        return io.Schema(node_id=cls.NODE_ID, display_name=cls.NAME, category=category,
                         description=" ".join((cls.__doc__ or "").split()), inputs=inputs, outputs=outputs, **flags)

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        for name, value in inputs.items():  # the host's min/max checks let NaN through (every comparison is False)
            if isinstance(value, float) and not math.isfinite(value):
                raise CollabNodeError(cls.NAME, f"'{name}' = {value} is not a finite number; type a number")
        try:
            out = cls.run(**inputs)
        except CollabError as err:
            raise node_error(cls.NAME, err) from err
        return out if isinstance(out, io.NodeOutput) else io.NodeOutput(*out)

    @classmethod
    def run(cls, **inputs):  # pragma: no cover - every node defines it
        raise NotImplementedError


def advanced(widget):
    """Mark a widget as advanced (folded away in front ends that support it; ignored by older ones)."""
    widget.extra_dict["advanced"] = True
    return widget


class CollabExtension(ComfyExtension):
    """What ``comfy_entrypoint`` hands the host: the pack's node classes."""

    def __init__(self, nodes: list):
        self.nodes = list(nodes)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return self.nodes


__all__ = ["io", "CollabNode", "CollabExtension", "Branches", "Encoder", "Diffuser", "Inversion", "advanced",
           "SEED_MAX", "CATEGORY", "CollabNodeError", "node_error"]
