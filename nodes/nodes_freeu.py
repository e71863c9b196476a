"""FreeU for the Collaborative Diffusion UNets.

The stock FreeU nodes scale the decoder stages of width 4·C and 2·C (Stable Diffusion's [1,2,4,4]); the
official 192-channel UNets ([1,2,3,5]) have no 768-wide stage, so b1/s1 never apply. This node targets the
model's real stages, the two levels below the deepest one (576 and 384 for the official UNets, as in the
authors' freeu/*_freeu.py), with the authors' defaults b1 1.1, b2 1.2, s1 1, s2 1.
"""

from __future__ import annotations

import logging

from . import host
from .freeu import FREEU_DEFAULTS, freeu_apply, freeu_scales
from .schema import CollabNode, CollabNodeError, io

_TIPS = {"b1": "Backbone scale of the deeper stage (576 channels in the official UNets).",
         "b2": "Backbone scale of the shallower stage (384 channels).",
         "s1": "Skip-connection scale of the deeper stage (low frequencies).",
         "s2": "Skip-connection scale of the shallower stage (low frequencies)."}


def _float(name: str):
    return io.Float.Input(name, default=FREEU_DEFAULTS[name], min=0.0, max=10.0, step=0.01, tooltip=_TIPS[name])


class CollabFreeU(CollabNode):
    """FreeU on the Collaborative Diffusion UNets' real stages (authors' defaults b1 1.1, b2 1.2, s1 1, s2 1)."""

    NODE_ID = "CollabFreeU"
    NAME = "Collaborative FreeU"

    @classmethod
    def define_schema(cls):
        return cls.schema(inputs=[io.Model.Input("model", tooltip="A Collaborative Diffusion UNet (or any LDM UNet).")]
                          + [_float(n) for n in ("b1", "b2", "s1", "s2")],
                          outputs=[io.Model.Output(tooltip="A patched clone; the input MODEL is unchanged.")])

    @classmethod
    def run(cls, model, b1, b2, s1, s2):
        unet = model.model.model_config.unet_config
        if "model_channels" not in unet or "channel_mult" not in unet:
            raise CollabNodeError(cls.NAME, "this MODEL is not a UNet with channel levels; FreeU needs one")
        scales = freeu_scales(unet["model_channels"], unet["channel_mult"], b1, b2, s1, s2)
        if host.model_info(model) is None:  # any LDM UNet works; say which stages are scaled
            logging.getLogger("collaborative_diffusion").info("Collaborative FreeU on a foreign model: stages %s",
                                                              sorted(scales))

        def output_block_patch(h, hsp, transformer_options):
            return freeu_apply(h, hsp, scales)

        m = model.clone()
        m.set_model_output_block_patch(output_block_patch)
        return (m,)


NODES = [CollabFreeU]
