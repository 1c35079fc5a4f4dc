"""Backbone registry for DP fine-tuning, in the style of timm's ``create_model``/``list_models``.

>>> from models import list_models, create_model, set_trainable
>>> created = create_model("vit_tiny_patch16_224", num_classes=10, pretrained="hub", image_size=32)
>>> set_trainable(created.model, "full")

Every model returned by ``create_model`` is already Opacus-compatible (see ``models.opacus_compat``);
pretrained BatchNorm networks have their BNs folded into the convolutions (``models.bn_fold``). Offline
weight sources (``pretrained="bundled"`` / ``"default"``, ``$DPCORE_WEIGHTS_DIR``) are in
``models.weight_sources``.
"""

from .bn_fold import fold_batchnorm
from .factory import NORMS, SCOPES, CreatedModel, create_model, saved_norm, set_trainable
from .opacus_compat import make_opacus_compatible
from .registry import DEFAULT_PRETRAINED_BACKBONE, BackboneSpec, get_spec, list_models
from .tiny_cnn import TinyCNN
from .weight_sources import CACHE_ENV, WEIGHTS_DIR_ENV, describe_source, list_weights_dir

__all__ = [
    "BackboneSpec",
    "CACHE_ENV",
    "CreatedModel",
    "DEFAULT_PRETRAINED_BACKBONE",
    "NORMS",
    "SCOPES",
    "TinyCNN",
    "WEIGHTS_DIR_ENV",
    "create_model",
    "describe_source",
    "fold_batchnorm",
    "get_spec",
    "list_models",
    "list_weights_dir",
    "make_opacus_compatible",
    "saved_norm",
    "set_trainable",
]
