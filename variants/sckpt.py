"""MAML (second order, fixed inner LR), every inner step checkpointed whole: against torch-maml"""
from harness.variants import Variant

VARIANT = Variant("sckpt", step_ckpt=1, description="MAML (second order, fixed inner LR), every inner step checkpointed whole: against torch-maml")
