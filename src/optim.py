"""The registry paths plugins were documented with: ``from src.optim import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY``.
Every name here is ``codeq``'s own object (``codeq.optim``), not a copy."""
from codeq.optim import (
    GROUPS,
    OPTIMIZER_REGISTRY,
    SCHEDULER_REGISTRY,
    build_optimizer,
    build_scheduler,
    group_of,
    param_groups,
)

__all__ = ["GROUPS", "OPTIMIZER_REGISTRY", "SCHEDULER_REGISTRY", "build_optimizer", "build_scheduler", "group_of",
           "param_groups"]
