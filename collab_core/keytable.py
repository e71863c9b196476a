"""The generic LDM <-> diffusers key-renaming engine shared by :mod:`collab_core.unet` and :mod:`collab_core.vae`.

A network's table is a list of :class:`KeyRule` (component prefix in the LDM layout -> prefix in the diffusers
layout); :func:`convert_with_table` renames a whole state dict either way and checks it against the shapes of the
diffusers model built on the meta device, so a file that does not fit fails with the keys that are wrong.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import CheckpointError

__all__ = ["KeyRule", "KeyTable", "child_indices", "convert_with_table", "diffusers_shapes", "instantiate_converted",
           "ldm_shapes", "sample_keys"]


@dataclass(frozen=True)
class KeyRule:
    """``src`` (LDM) and ``dst`` (diffusers) are whole-component key prefixes.

    ``sub`` maps the part between the prefix and the parameter name (``None`` = kept as is);
    ``squeeze`` lists sub-keys whose ``[C, C, 1, 1]`` conv weights are ``[C, C]`` Linear weights
    in diffusers.
    """

    src: str
    dst: str
    sub: Mapping[str, str] | None = None
    squeeze: frozenset[str] = frozenset()


class KeyTable:
    """Bidirectional LDM <-> diffusers key renaming by longest component prefix."""

    def __init__(self, rules: Iterable[KeyRule]):
        self.rules = list(rules)
        self._fwd = {r.src: r for r in self.rules}
        self._bwd = {r.dst: r for r in self.rules}
        self._max_depth = max((max(r.src.count("."), r.dst.count(".")) + 1 for r in self.rules), default=1)

    @staticmethod
    def _lookup(key: str, table: Mapping[str, KeyRule], depth: int) -> tuple[KeyRule, str] | None:
        parts = key.split(".")
        for n in range(min(depth, len(parts) - 1), 0, -1):
            rule = table.get(".".join(parts[:n]))
            if rule is not None:
                return rule, ".".join(parts[n:])
        return None

    def _map(self, key: str, forward: bool) -> tuple[str, bool] | None:
        found = self._lookup(key, self._fwd if forward else self._bwd, self._max_depth)
        if found is None:
            return None
        rule, rest = found
        head, _, param = rest.rpartition(".")
        if rule.sub is None:
            new_rest, sub_src = rest, head
        else:
            sub = rule.sub if forward else {v: k for k, v in rule.sub.items()}
            if head not in sub:
                return None
            new_rest = f"{sub[head]}.{param}"
            sub_src = head if forward else sub[head]
        new_prefix = rule.dst if forward else rule.src
        return f"{new_prefix}.{new_rest}", (param == "weight" and sub_src in rule.squeeze)

    def to_diffusers(self, key: str) -> tuple[str, bool] | None:
        """(diffusers key, needs squeeze) or None when the key belongs to no rule."""
        return self._map(key, True)

    def to_ldm(self, key: str) -> tuple[str, bool] | None:
        """(LDM key, needs unsqueeze) or None."""
        return self._map(key, False)


def sample_keys(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def convert_with_table(
    sd: Mapping[str, torch.Tensor],
    table: KeyTable,
    expected: Mapping[str, torch.Size],
    what: str,
    forward: bool = True,
    ignore: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename ``sd`` with ``table`` and check the result against ``expected`` shapes.

    Errors name keys in the *input's* layout, which is what the user's file contains.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if ignore is not None and ignore(key):
            continue
        mapped = table.to_diffusers(key) if forward else table.to_ldm(key)
        if mapped is None:
            unexpected.append(key)
            continue
        new_key, reshape = mapped
        if reshape:
            if forward and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
            elif not forward and value.ndim == 2:
                value = value[:, :, None, None]
        if new_key in expected:
            out[new_key] = value
        else:
            unexpected.append(key)
    back = table.to_ldm if forward else table.to_diffusers
    missing = []
    for k in expected:
        if k not in out:
            m = back(k)
            missing.append(m[0] if m else k)
    wrong = []
    for k, v in out.items():
        exp = expected[k]
        if tuple(v.shape) != tuple(exp):
            wrong.append(f"{k}: {tuple(v.shape)} vs expected {tuple(exp)}")
    if unexpected or missing or wrong:
        msg = [f"{what}: the weights do not fit the inferred architecture."]
        if missing:
            msg.append(f"missing keys: {sample_keys(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {sample_keys(unexpected)}")
        if wrong:
            msg.append(f"shape mismatches: {sample_keys(wrong, 4)}")
        msg.append("The file may be incomplete or not the network it is loaded as.")
        raise CheckpointError(" ".join(msg))
    return out


def child_indices(sd: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


@functools.lru_cache(maxsize=32)
def diffusers_shapes(model_class: str, config) -> dict[str, torch.Size]:
    """Parameter shapes of diffusers' ``model_class`` built from ``config`` on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config.diffusers_kwargs())
    return {k: v.shape for k, v in model.state_dict().items()}


def ldm_shapes(table: KeyTable, shapes: Mapping[str, torch.Size], what: str) -> dict[str, torch.Size]:
    """The LDM-layout keys and shapes that correspond to diffusers ``shapes`` under ``table``."""
    expected = {}
    for k, shape in shapes.items():
        mapped = table.to_ldm(k)
        if mapped is None:  # cannot happen unless diffusers grew a parameter we do not map
            raise CheckpointError(f"diffusers {what} parameter {k!r} has no LDM counterpart")
        name, unsqueeze = mapped
        expected[name] = torch.Size((*shape, 1, 1)) if unsqueeze else shape
    return expected


def instantiate_converted(model_class: str, config, converted: Mapping[str, torch.Tensor], dtype: torch.dtype,
                          device) -> torch.nn.Module:
    """diffusers' ``model_class`` built on the meta device with ``converted`` assigned into it (eval mode, no
    gradients): no random initialisation runs and memory-mapped weights are not copied a second time."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config.diffusers_kwargs())
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if not any(t.is_meta for t in tensors.values()):  # meta in, meta out: shape-only builds skip the check
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(f"internal error: no weights for {sample_keys(left)}")
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model
