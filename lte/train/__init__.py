"""The front door: the lte-train command (cli: training, serve / join, report, resize-images), the
Python entry lte.train.run (entry), `python -m lte.train`, and finished runs side by side (report).
It starts a mode (lte.single, lte.distributed); what the modes share is in lte.runtime."""
from .entry import run

__all__ = ["run"]
