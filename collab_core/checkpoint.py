"""Read weights files into a flat ``{key: Tensor}`` dict without ever running code from them.

The official Collaborative Diffusion checkpoints are PyTorch-Lightning pickles. Besides the
``state_dict`` they hold optimizer moments (more than half of a 6.6 GB file) and Lightning
metadata whose pickled form names classes such as ``ModelCheckpoint``. Plain ``torch.load`` would
import and run whatever those pickles name, so this module:

1. tries ``torch.load(weights_only=True, mmap=True)`` (PyTorch's own safe unpickler);
2. if the file names other globals, loads it again with a restricted unpickler of our own that
   returns the real object only for tensor-rebuild helpers, inert stand-ins for globals from known
   metadata packages (Lightning, OmegaConf, NumPy, ...), and refuses everything else *before* it
   can be called.

Both paths memory-map the zip archive, so tensors we drop (optimizer state) are never read from
disk and the weights we keep are not copied a second time.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import tempfile
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "read_state_dict",
    "read_checkpoint_metadata",
    "save_safetensors",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)

_UNSAFE_HINT = (
    "Do not open this file with torch.load(weights_only=False) or any other unpickler that runs code: that would run "
    "what it names. The official checkpoints hold only tensors and Lightning metadata and load here as they are; get "
    "this one again from where the model is published, or ask its author for a .safetensors file."
)


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class UnsafeGlobalError(pickle.UnpicklingError):
    """The pickle names a global we will not resolve; raised before anything is called."""

    def __init__(self, module: str, name: str):
        super().__init__(f"refused global {module}.{name}")
        self.module = module
        self.name = name


class _Inert:
    """Stand-in for a metadata object (Lightning callback state, OmegaConf node, NumPy scalar...).

    Instances only record what pickle hands them. Nothing of the original class is imported or
    run, which is why it is safe to let these globals through: we never need their values, only
    the tensors stored next to them.
    """

    _collab_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_inert_args", (args, kwargs))
        object.__setattr__(obj, "_inert_state", None)
        object.__setattr__(obj, "_inert_items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_inert_state", state)

    # dict- and list-like subclasses are rebuilt with SETITEMS / APPENDS opcodes
    def __setitem__(self, key: Any, value: Any) -> None:
        self._inert_items.append((key, value))

    def append(self, value: Any) -> None:
        self._inert_items.append(value)

    def extend(self, values: Any) -> None:
        self._inert_items.extend(values)

    def __repr__(self) -> str:
        return f"<inert stand-in for {self._collab_global}>"


# Top-level packages whose pickled objects are metadata we drop anyway.
_STUB_PACKAGES = frozenset(
    {
        "pytorch_lightning",
        "lightning",
        "lightning_fabric",
        "lightning_utilities",
        "torchmetrics",
        "omegaconf",
        "numpy",
        "pathlib",
        "typing",
        "datetime",
        "enum",
    }
)
# Single globals that are harmless as inert stand-ins.
_STUB_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "collections.defaultdict",
        "collections.Counter",
        "collections.deque",
        "copyreg._reconstructor",
        "_codecs.encode",
    }
)


def _real_globals() -> dict[str, Any]:
    """Globals resolved to the real object: what torch needs to rebuild tensors and containers."""
    real: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
        "torch.UntypedStorage": torch.UntypedStorage,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.slice": slice,
        "builtins.range": range,
        "builtins.object": object,
    }
    for fname in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_meta_tensor_no_storage",
    ):
        fn = getattr(torch._utils, fname, None)
        if fn is not None:
            real[f"torch._utils.{fname}"] = fn
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            real[str(value)] = value  # str(torch.float32) == "torch.float32"
    return real


_REAL_GLOBALS: dict[str, Any] | None = None
_STUB_CACHE: dict[str, type] = {}


def _stub_for(module: str, name: str) -> type:
    key = f"{module}.{name}"
    cls = _STUB_CACHE.get(key)
    if cls is None:
        safe_name = name.replace(".", "_") or "anonymous"
        cls = type(safe_name, (_Inert,), {"_collab_global": key, "__module__": __name__})
        _STUB_CACHE[key] = cls
    return cls


def _is_stubbable(module: str, name: str) -> bool:
    return module.split(".", 1)[0] in _STUB_PACKAGES or f"{module}.{name}" in _STUB_GLOBALS


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` is the only door through which a pickle reaches code; we keep it narrow."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        global _REAL_GLOBALS
        # torch.save writes protocol 2, which records Python-2 module names (__builtin__, copy_reg)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if _REAL_GLOBALS is None:
            _REAL_GLOBALS = _real_globals()
        obj = _REAL_GLOBALS.get(f"{module}.{name}")
        if obj is not None:
            return obj
        if _is_stubbable(module, name):
            return _stub_for(module, name)
        raise UnsafeGlobalError(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# torch.load wants a module-like object (it subclasses `.Unpickler` and, for old files, calls `.load`).
restricted_pickle = types.ModuleType("collab_core.checkpoint.restricted_pickle")
restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.loads = _restricted_loads  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
restricted_pickle.__doc__ = "pickle replacement for torch.load that never imports or calls unlisted globals"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _damaged(path: Path, exc: BaseException | None = None) -> CheckpointError:
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return CheckpointError(
        f"checkpoint {path} is damaged or incomplete and cannot be read{detail}. "
        "The download was probably interrupted: download the file again "
        "(compare its size with the source)."
    )


def _sniff(path: Path) -> str:
    """Classify by content, because a wrong file under the right name is a common user mistake
    (an HTML error page from a download site, a Git LFS pointer, an empty file)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download it again.")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer, not the weights; fetch the real file (`git lfs pull`)."
        )
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"{\"error", b"<head")):
        raise CheckpointError(
            f"{path} is a web page or text, not a checkpoint (it starts with {head[:20]!r}); "
            "the download saved an error/confirmation page instead of the file. Download it again."
        )
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000:
            return "safetensors"
    if head[:1] == b"\x80":
        return "legacy_pickle"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own Rust-side error type
        raise _damaged(path, exc) from exc


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise _damaged(path, exc) from exc


def _load_pickled(path: Path, kind: str) -> Any:
    use_mmap = kind == "zip"
    if use_mmap and _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (a compiled model), not a checkpoint; "
            "export its state_dict to a .safetensors or .ckpt file instead."
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError:
        pass  # the file names globals beyond torch's allowlist; try our stand-ins below
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise _damaged(path, exc) from exc
    try:
        return torch.load(
            str(path),
            map_location="cpu",
            weights_only=False,
            mmap=use_mmap,
            pickle_module=restricted_pickle,
        )
    except UnsafeGlobalError as exc:
        raise CheckpointError(
            f"refusing to load {path}: its pickle refers to `{exc.module}.{exc.name}`, which is not "
            "a tensor or known checkpoint metadata. Loading it would run code from the file, so it "
            "was not run. " + _UNSAFE_HINT
        ) from exc
    except Exception as exc:
        raise _damaged(path, exc) from exc


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
        where = "its 'state_dict'"
    elif isinstance(obj, Mapping):
        sd = obj
        where = "it"
        non_tensor = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if non_tensor:
            raise CheckpointError(
                f"{path} has no 'state_dict' entry and is not a plain state dict "
                f"(top-level keys: {', '.join(map(str, list(obj)[:8]))}). "
                "Expected an official Collaborative Diffusion / LDM checkpoint."
            )
    else:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict; "
            "expected a checkpoint with a 'state_dict' or a dict of tensors."
        )
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors.")
    if len(sd) == 0:
        raise CheckpointError(f"{path}: {where} holds no tensors (empty state dict).")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string.")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "the file is not a plain weights checkpoint."
            )
        # detach() turns Parameters into plain tensors sharing the (memory-mapped) storage
        out[key] = value.detach()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return the model weights of a ``.ckpt``/``.pt``/``.pth``/``.bin`` or ``.safetensors`` file.

    Lightning checkpoints yield their ``state_dict`` only (optimizer state and metadata are dropped
    unread). Pickles are never allowed to execute code; see the module docstring. Raises
    :class:`CheckpointError` for missing, damaged, unsafe or non-weights files.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; give the path of a .ckpt or .safetensors file.")
    suffix = p.suffix.lower()
    if suffix not in PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise CheckpointError(
            f"{p}: unsupported file type {suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)}."
        )
    kind = _sniff(p)
    if kind == "safetensors":
        sd = _read_safetensors(p)
        if not sd:
            raise CheckpointError(f"{p}: the file holds no tensors (empty state dict).")
        return sd
    if suffix in SAFETENSORS_SUFFIXES:
        # named .safetensors but not one: either truncated header or another format entirely
        raise _damaged(p)
    if kind == "unknown":
        raise CheckpointError(
            f"{p} is not a PyTorch checkpoint (unrecognised content starting with {_head(p)!r}); "
            "it may be damaged - download it again."
        )
    return _extract_state_dict(_load_pickled(p, kind), p)


def _head(p: Path) -> bytes:
    with open(p, "rb") as fh:
        return fh.read(16)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Safetensors header metadata (``{}`` for pickles or files without any)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if _sniff(p) != "safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise _damaged(p, exc) from exc


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file + rename), creating parent folders.

    safetensors refuses non-contiguous tensors and tensors sharing storage (memory-mapped
    checkpoints and tied weights produce both), so each tensor is made contiguous and a second
    tensor over an already-written storage is cloned.
    """
    from safetensors.torch import save_file

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    clean: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot save {key!r}: a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise CheckpointError(f"cannot save {key!r}: it is a meta tensor without data")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if ident[0] != 0 and ident in seen:
            t = t.clone()
        elif ident[0] != 0:
            seen.add(ident)
        clean[str(key)] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the result gets the user's usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p
