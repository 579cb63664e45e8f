"""Per-worker memory options: how the frozen base weight is stored (fp32, bf16, nf4, fp4, int8; base_formats),
what the heads keep for backward (full, lora_fa, velora; activations), the settings options declare
(settings: SETTINGS, every declared setting by key), and how to count what autograd keeps
(accounting). Each option is an object from a registry (FORMATS, ACTIVATIONS). Local-chunk training, a way
of running a round, is in lte.runtime.chunks."""
from .activations import ACTIVATIONS, Activations, check_reset, get_activations
from .base_formats import FORMATS, BaseFormat, check_runs_on, get_format
from .settings import Setting, declared, with_settings

SETTINGS = declared(ACTIVATIONS, FORMATS)  # every memory option's settings, by key

__all__ = ["ACTIVATIONS", "Activations", "check_reset", "get_activations", "FORMATS", "BaseFormat", "check_runs_on",
           "get_format", "SETTINGS", "Setting", "with_settings"]
