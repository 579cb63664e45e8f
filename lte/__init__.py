"""lte: pre-training from scratch with LoRA-the-Explorer (parallel low-rank heads, merged often).

    import lte
    model = lte.prepare(model, lte.LTEConfig(heads=32, rank=64, alpha=4096))
    ... train ...; lte.merge(model); ...
    state_dict = lte.export(model)
"""
from .core import LTEConfig, OuterOptimizer, export, merge, prepare
from .errors import BatchError, ConfigError, ModelError, UserError

__version__ = "0.1.0"
__all__ = ["LTEConfig", "OuterOptimizer", "prepare", "merge", "export", "UserError", "ConfigError", "BatchError",
           "ModelError", "__version__"]
