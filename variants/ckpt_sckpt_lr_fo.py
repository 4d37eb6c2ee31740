"""first order, learnable LR, per-layer and whole-step checkpointing"""
from harness.variants import Variant

VARIANT = Variant("ckpt_sckpt_lr_fo", layer_ckpt=True, step_ckpt=1, learn_lr=True, first_order=True, description="first order, learnable LR, per-layer and whole-step checkpointing")
