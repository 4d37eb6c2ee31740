"""MAML (second order, fixed inner LR) with the meta-batch's tasks vectorized by torch.func.vmap"""
from harness.variants import Variant

VARIANT = Variant("vmaml", vectorize=True, description="MAML (second order, fixed inner LR) with the meta-batch's tasks vectorized by torch.func.vmap")
