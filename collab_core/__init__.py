"""Collaborative Diffusion (Huang et al., CVPR 2023), host-free.

Uni-modal latent diffusion models (text→face, mask→face) collaborate without retraining: per step, a
dynamic diffuser per modality predicts a spatial influence map, the maps are normalised across modalities
and the branches' noise predictions are fused as a per-pixel weighted sum.

Public API::

    from collab_core import load_pipeline
    pipe = load_pipeline("pretrained/")          # no argument: the demo models shipped with the pack
    pipe.generate(text="...", mask="mask.png", seed=0).save("outputs/")
"""

from .errors import (BranchMismatchError, CheckpointError, CollabError, ConditioningError, ConfigError, InputError,
                     NumericalError)
from .fusion import BranchInfluence, InfluenceConfig, fuse
from .pipeline import Branch, CollaborativePipeline, GenerationResult
from .models import demo_defaults, load_pipeline
from .sampling import sample_ddim
from .schedule import ddim_schedule, make_alphas_cumprod

__version__ = "0.1.0"

__all__ = [
    "Branch", "BranchInfluence", "BranchMismatchError", "CheckpointError", "CollabError", "CollaborativePipeline",
    "ConditioningError", "ConfigError", "GenerationResult", "InfluenceConfig", "InputError", "NumericalError",
    "ddim_schedule", "demo_defaults", "fuse", "load_pipeline", "make_alphas_cumprod", "sample_ddim",
]
