"""Per-worker memory options. So far: how the frozen base weight is stored (fp32, bf16, nf4, fp4, int8)."""
from .base_formats import FORMATS, BaseFormat, check_runs_on, get_format

__all__ = ["FORMATS", "BaseFormat", "check_runs_on", "get_format"]
