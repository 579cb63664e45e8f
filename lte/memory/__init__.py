"""Per-worker memory options: how the frozen base weight is stored (fp32, bf16, nf4, fp4, int8; base_formats),
what the heads keep for backward (full, lora_fa, velora; activations), and how to count what autograd keeps
(accounting). Each option is an object from a registry (FORMATS, ACTIVATIONS). Local-chunk training, a way
of running a round, is in lte.train.chunks."""
from .activations import ACTIVATIONS, Activations, check_reset, get_activations
from .base_formats import FORMATS, BaseFormat, check_runs_on, get_format

__all__ = ["ACTIVATIONS", "Activations", "check_reset", "get_activations", "FORMATS", "BaseFormat", "check_runs_on",
           "get_format"]
