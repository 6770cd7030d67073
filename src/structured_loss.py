"""The seed's path to the loss terms: ``from src.structured_loss import LOSS_REGISTRY, group_lasso`` keeps working
from a checkout. Every name here is ``codeq``'s own object (``codeq.regularizers``), not a copy."""
from codeq.attach import latent_weight
from codeq.regularizers import LOSS_REGISTRY, LossTerm, bit_l2, check_loss, column_norm_sum, dz_l2, group_lasso

__all__ = ["LOSS_REGISTRY", "LossTerm", "bit_l2", "check_loss", "column_norm_sum", "dz_l2", "group_lasso",
           "latent_weight"]
