"""second order, learnable LR, per-layer and whole-step checkpointing"""
from harness.variants import Variant

VARIANT = Variant("ckpt_sckpt_lr", layer_ckpt=True, step_ckpt=1, learn_lr=True, description="second order, learnable LR, per-layer and whole-step checkpointing")
