"""per-layer checkpointing, learnable LR, first order"""
from harness.variants import Variant

VARIANT = Variant("ckpt_lr_fo", layer_ckpt=True, learn_lr=True, first_order=True, description="per-layer checkpointing, learnable LR, first order")
