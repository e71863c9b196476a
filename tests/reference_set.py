"""One golden set of the reference implementation, read from its ``manifest.json`` alone (no tests here).

Every parity test takes what it compares from here: the runs of a kind with their seed, eta, steps, batch, text and
mask; the checkpoint of a role (``vae``/``text``/``mask``/``codiff``, as ``weights.checkpoints`` names them); the
config of a role; and the sizes the configs set (attention heads, encoder widths). Nothing is assumed about file
names (``tiny_*`` or the official ``512_*``), ``.safetensors`` twins, seeds, prompts or which run kinds a set holds:
a test that needs a run kind the set lacks skips with that reason.

The configs are told apart by what they build (their ``target`` classes), not by their names, and are read here
with plain ``yaml.safe_load`` -- independently of :mod:`collab_core.yaml_config`, which the tests check.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

ROLES = ("vae", "text", "mask", "codiff")
GOLDEN_FIXTURES = ("ref_dir", "ref", "fixture_dir")  # the fixtures that need the golden data (marker ``parity``)
RUN_KINDS = ("codiff", "text", "mask")
# What each run kind is conditioned on (the reference's generate.py / text2image.py / mask2image.py).
CONDITIONS = {"codiff": ("mask", "text"), "text": ("text",), "mask": ("mask",)}


def _params(node: Any) -> dict:
    return (node or {}).get("params") or {}


def _role_of_config(model: dict) -> Optional[str]:
    target = str(model.get("target", ""))
    params = _params(model)
    if target.endswith("AutoencoderKL"):
        return "vae"
    if target.endswith("LatentDiffusionCompose"):
        return "codiff"
    cond = str((params.get("cond_stage_config") or {}).get("target", ""))
    if cond.endswith("BERTEmbedder"):
        return "text"
    if cond.endswith("SegMaskEncoder"):
        return "mask"
    return None


class ReferenceSet:
    """The golden set in ``root`` (a directory holding ``manifest.json``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())

    # --- runs -------------------------------------------------------------------------------------------------

    def runs(self, kind: Optional[str] = None) -> list[dict]:
        return [r for r in self.manifest.get("runs", []) if kind is None or r["kind"] == kind]

    def kinds(self) -> list[str]:
        return sorted({r["kind"] for r in self.runs()})

    def runs_or_skip(self, *kinds: str) -> list[dict]:
        """The runs of ``kinds``; skips the calling test when the set has none of them."""
        runs = [r for r in self.runs() if r["kind"] in kinds]
        if not runs:
            have = sorted({r["kind"] for r in self.runs()})
            pytest.skip(f"the golden set {self.root} has no {'/'.join(kinds)} runs (it has: {', '.join(have) or 'none'})")
        return runs

    def golden(self, run: dict) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.root / run["file"]))

    # --- inputs -----------------------------------------------------------------------------------------------

    @functools.cached_property
    def inputs(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.root / self.manifest["inputs"].get("file", "inputs.safetensors")))

    @property
    def text(self) -> str:
        """The prompt the set's inputs were encoded from (``inputs.text``)."""
        return self.manifest["inputs"]["text"]

    @property
    def mask_label_key(self) -> str:
        """The name of the label-map tensor in the inputs file (``mask_label_<side>``)."""
        keys = [k for k in self.manifest["inputs"]["tensors"] if k.startswith("mask_label_")]
        assert len(keys) == 1, f"inputs should hold one mask_label_* tensor, not {keys}"
        return keys[0]

    @property
    def mask_labels(self):
        return self.inputs[self.mask_label_key]

    def conditions(self, run: dict) -> dict:
        """The conditions of ``run`` as the pipeline takes them: its own text, and its mask as the inputs' label map
        (skips when the run was made from a mask other than the one the inputs file holds)."""
        conds = {}
        kinds = CONDITIONS[run["kind"]]
        if "text" in kinds:
            conds["text"] = run.get("text", self.text)
        if "mask" in kinds:
            if run.get("mask", self.manifest["inputs"].get("mask")) != self.manifest["inputs"].get("mask"):
                pytest.skip(f"{run['file']} was made from mask {run.get('mask')}, the inputs file holds only "
                            f"{self.manifest['inputs'].get('mask')}")
            conds["mask"] = self.mask_labels
        return conds

    # --- checkpoints ------------------------------------------------------------------------------------------

    def checkpoint_files(self, role: str) -> list[Path]:
        entry = self.manifest["weights"]["checkpoints"].get(role)
        if entry is None:
            pytest.skip(f"the golden set {self.root} has no {role} checkpoint")
        return [self.root / f for f in entry["files"]]

    def checkpoint(self, role: str, prefer: str = ".safetensors") -> Path:
        """The file of ``role``: its ``prefer`` form where the set has it, else the other (``.ckpt``/``.safetensors``)."""
        files = self.checkpoint_files(role)
        for f in files:
            if f.name.endswith(prefer):
                return f
        return files[0]

    def ckpt(self, role: str) -> Path:
        """The pickle checkpoint of ``role`` as the reference wrote it (the safetensors twin where there is no pickle)."""
        return self.checkpoint(role, ".ckpt")

    def twins(self) -> list[tuple[str, Path, Path]]:
        """(role, .ckpt, .safetensors) for every role the set holds in both forms."""
        out = []
        for role, entry in self.manifest["weights"]["checkpoints"].items():
            ck = [self.root / f for f in entry["files"] if f.endswith(".ckpt")]
            st = [self.root / f for f in entry["files"] if f.endswith(".safetensors")]
            if ck and st:
                out.append((role, ck[0], st[0]))
        return out

    def weights_entry(self, role: str) -> dict:
        return self.manifest["weights"]["checkpoints"][role]

    # --- configs ----------------------------------------------------------------------------------------------

    @functools.cached_property
    def _configs(self) -> dict[str, tuple[Path, dict]]:
        out: dict[str, tuple[Path, dict]] = {}
        for rel in self.manifest.get("configs", {}):
            path = self.root / rel
            model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
            role = _role_of_config(model)
            if role is not None:
                assert role not in out, f"two {role} configs in the manifest: {out[role][0]} and {path}"
                out[role] = (path, model)
        return out

    def config_path(self, role: str) -> Path:
        if role not in self._configs:
            pytest.skip(f"the golden set {self.root} lists no {role} config")
        return self._configs[role][0]

    def config_params(self, role: str) -> dict:
        self.config_path(role)
        return _params(self._configs[role][1])

    def _heads(self, params: dict, what: str) -> int:
        heads = params.get("num_heads", -1)
        if params.get("num_head_channels", -1) not in (-1, None) or heads in (-1, None):
            pytest.skip(f"the {what} of {self.root} sets its attention by num_head_channels, not num_heads")
        return int(heads)

    def unet_heads(self, modality: str) -> int:
        """``num_heads`` of the uni-modal UNet of ``modality`` (its own config's ``unet_config``)."""
        return self._heads(_params(self.config_params(modality)["unet_config"]), f"{modality} UNet")

    def diffuser_heads(self) -> int:
        compose = _params(self.config_params("codiff")["compose_unet_config"])
        return self._heads(_params(compose["confidence_map_predictor_config"]), "dynamic diffuser")

    def text_encoder_size(self) -> tuple[int, int]:
        """(n_embed, n_layer) of the BERTEmbedder."""
        p = _params(self.config_params("text")["cond_stage_config"])
        return int(p["n_embed"]), int(p["n_layer"])

    def mask_context_dim(self) -> int:
        return int(_params(self.config_params("mask")["cond_stage_config"])["context_dim"])


@functools.lru_cache(maxsize=None)
def reference_set(root: Path) -> ReferenceSet:
    return ReferenceSet(Path(root))
