"""Models: image and text towers, heads, alignment layers; architectures from JSON configs."""

from secure_fedvlp.models import grad_samplers  # noqa: F401  (registers Opacus grad samplers)
from secure_fedvlp.models.factory import create_model, default_text_weights_dir, get_model_spec, list_models
from secure_fedvlp.models.vlp import LogitScale, ModelSpec, VLPModel

__all__ = [
    "create_model",
    "default_text_weights_dir",
    "get_model_spec",
    "list_models",
    "LogitScale",
    "ModelSpec",
    "VLPModel",
]
