"""Multi-modal editing of a real picture (see docs/editing.md).

Imagic, as in the reference (per branch: optimise the embedding, fine-tune a copy of the UNet, interpolate), then
sampled collaboratively::

    from collab_core.editing import ImagicConfig, run_imagic, collaborative_edit, encode_image, load_image
    z0 = encode_image(pipe, load_image("27044.png"), seed=0)
    text = run_imagic(pipe, "text", z0, pipe.encode({"text": "He is a teen."})["text"], ImagicConfig(), work_dir="w/t")
    mask = run_imagic(pipe, "mask", z0, pipe.encode({"mask": "edited_mask.png"})["mask"], work_dir="w/m")
    result = collaborative_edit(pipe, {"text": text, "mask": mask}, alpha={"text": 0.9, "mask": 1.0})

A photo of any size, parsed, painted and pasted back at full resolution::

    from collab_core.editing import edit_photo
    from collab_core.face_parsing import FaceParser
    result = edit_photo(pipe, "phone.jpg", paint=[("hair", "strokes.png")], parser=FaceParser.from_folder("parser"),
                        text="She has long hair.")
    result.image  # uint8 (H, W, 3) at the photo's size; outside the edited region the photo's own pixels

The fast edit without fine-tuning (DDIM inversion under the collaborative model, resampling)::

    from collab_core.editing import edit_by_inversion
    result = edit_by_inversion(pipe, "27044.png", target={"mask": "edited.png", "text": "..."},
                               source={"mask": "27044_mask.png"})
"""

from importlib import import_module

# Names are loaded on first use, so that the command line can build its parser without importing torch.
_EXPORTS = {
    "edit": ("EditResult", "collaborative_edit", "edit_by_inversion", "recording_denoiser"),
    "imagic": ("COLLABORATIVE_ALPHAS", "REFERENCE_ALPHAS", "ImagicConfig", "StageResult", "StageState",
               "UnimodalEdit", "evaluation_loss", "finetune_unet", "interpolate", "load_tuned_unet",
               "optimize_embedding", "run_imagic", "save_tuned_unet", "single_branch", "trainable_copy",
               "tuned_pipeline"),
    "inputs": ("changed_labels", "check_sizes", "edit_region", "encode_image", "load_image", "load_region",
               "native_image_size"),
    "inversion": ("Inversion", "ddim_invert", "invert_step", "sample_from_inversion", "steps_for_strength"),
    "photo": ("PhotoEdit", "PhotoPlan", "edit_photo", "prepare_photo"),
    "metrics": ("colour_agreement", "edit_report", "label_agreement", "psnr", "ssim"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
