"""The pack's one error convention, host-free: an error names the node it comes from and says the fix.

``schema.CollabNode.execute`` applies it to every core error; the host-free helpers (``branches``) raise it
directly. It lives apart from ``schema`` because ``schema`` imports the host's node API and these helpers are
tested without a host.
"""

from __future__ import annotations

from ..collab_core.errors import CollabError


class CollabNodeError(CollabError):
    """An error a user can act on, naming the node it comes from and the fix."""

    def __init__(self, node: str, message: str):
        self.node = node
        self.detail = message
        super().__init__(f"[{node}] {message}")


def node_error(node: str, err: BaseException | str) -> CollabNodeError:
    """Wrap a core error (or a message) so that the host shows which node failed and how to fix it."""
    if isinstance(err, CollabNodeError):
        return err
    return CollabNodeError(node, str(err))
