"""Backbone registry for DP fine-tuning, in the style of timm's ``create_model``/``list_models``.

>>> from models import list_models, create_model, set_trainable
>>> created = create_model("vit_tiny_patch16_224", num_classes=10, pretrained="hub", image_size=32)
>>> set_trainable(created.model, "full")

Every model returned by ``create_model`` is already Opacus-compatible (see ``models.opacus_compat``).
"""

from .factory import SCOPES, CreatedModel, create_model, set_trainable
from .opacus_compat import make_opacus_compatible
from .registry import BackboneSpec, get_spec, list_models
from .tiny_cnn import TinyCNN

__all__ = [
    "BackboneSpec",
    "CreatedModel",
    "SCOPES",
    "TinyCNN",
    "create_model",
    "get_spec",
    "list_models",
    "make_opacus_compatible",
    "set_trainable",
]
