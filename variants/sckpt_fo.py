"""first order, fixed inner LR, every inner step checkpointed whole"""
from harness.variants import Variant

VARIANT = Variant("sckpt_fo", step_ckpt=1, first_order=True, description="first order, fixed inner LR, every inner step checkpointed whole")
