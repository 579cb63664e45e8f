"""Models by name. Importing a model file registers its constructors."""
from . import gpt, mixer, torchvision_vit, vit  # noqa: F401  (registers)
from .registry import available, create_model, register, stated_depth, stated_sizes

__all__ = ["available", "create_model", "register", "stated_depth", "stated_sizes"]
