"""The registry path plugins were documented with: ``from src.models import MODEL_REGISTRY``. Every name here is
``codeq``'s own object (``codeq.models``), not a copy."""
from codeq.models import MODEL_REGISTRY, check_model, create_model, mlp, vit_tiny
from codeq.models.cifar_resnet import BasicBlock, CifarResNet, PadShortcut, cifar_resnet

__all__ = ["MODEL_REGISTRY", "BasicBlock", "CifarResNet", "PadShortcut", "check_model", "cifar_resnet",
           "create_model", "mlp", "vit_tiny"]
