from .config import COCO_RECIPE, RECIPES, VOC_RECIPE, TrainConfig
from ..losses import compute_losses
from .loop import NonFiniteLoss, Trainer, loss_weights
from .optim import build_optimizer, build_scheduler, lr_factor

__all__ = ["TrainConfig", "VOC_RECIPE", "COCO_RECIPE", "RECIPES", "Trainer", "NonFiniteLoss", "compute_losses",
           "loss_weights", "build_optimizer", "build_scheduler", "lr_factor"]
