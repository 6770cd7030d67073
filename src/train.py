"""The seed's path to the training loop: ``from src.train import train`` (and ``validate``) keeps working from a
checkout, ``train(train_loader, model, criterion, optimizer, epoch, device, loss_fns=[(fn, weight, kwargs)])``.
Every name here is ``codeq``'s own object (``codeq.training.loop``), not a copy."""
from codeq.regularizers import LossTerm
from codeq.training.loop import EpochState, Progress, RunningMean, raise_if_nonfinite, train, validate

__all__ = ["EpochState", "LossTerm", "Progress", "RunningMean", "raise_if_nonfinite", "train", "validate"]
