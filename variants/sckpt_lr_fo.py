"""first order, learnable LR, every inner step checkpointed whole"""
from harness.variants import Variant

VARIANT = Variant("sckpt_lr_fo", step_ckpt=1, learn_lr=True, first_order=True, description="first order, learnable LR, every inner step checkpointed whole")
