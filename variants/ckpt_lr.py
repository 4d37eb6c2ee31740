"""the seed's combination: per-layer checkpointing, learnable LR, second order"""
from harness.variants import Variant

VARIANT = Variant("ckpt_lr", layer_ckpt=True, learn_lr=True, description="the seed's combination: per-layer checkpointing, learnable LR, second order")
