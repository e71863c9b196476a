"""Errors the pack raises for bad input.

Every message names the problem and the fix, so that a user never has to read a
traceback from deep inside torch to understand what went wrong.
"""


class CollabError(Exception):
    """Base class: an input the pack cannot use, with a message saying how to fix it."""


class CheckpointError(CollabError):
    """A weights file that is missing, unreadable, unsafe, or not of the expected kind."""


class ConfigError(CollabError):
    """A configuration (YAML override or inferred) that does not fit the weights."""


class ConditioningError(CollabError):
    """A text or mask condition that cannot be encoded (empty text, unknown mask colours, ...)."""


class BranchMismatchError(CollabError):
    """Branches, dynamic diffusers or latents that do not fit together."""


class InputError(CollabError, ValueError):
    """An argument of the wrong type, out of range, not finite, or a path of the wrong kind (checked before any
    work starts). Also a ``ValueError``, so code that guards a call with ``except ValueError`` still catches it."""


class NumericalError(CollabError):
    """A network produced non-finite values while sampling (broken weights or an input far outside training)."""
