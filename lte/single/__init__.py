"""The single-process modes: simulated LTE heads (mode=lte) and full-rank training (mode=full). Their
loop, the Trainer, is also each DDP and DiLoCo rank's (lte.distributed.ddp, diloco)."""
from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
