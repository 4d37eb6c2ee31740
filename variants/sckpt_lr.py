"""second order, learnable LR, every inner step checkpointed whole"""
from harness.variants import Variant

VARIANT = Variant("sckpt_lr", step_ckpt=1, learn_lr=True, description="second order, learnable LR, every inner step checkpointed whole")
