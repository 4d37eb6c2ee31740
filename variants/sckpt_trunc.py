"""truncated MAML (last T inner steps back-propagated), every inner step checkpointed whole"""
from harness.variants import Variant

VARIANT = Variant("sckpt_trunc", estimator="truncated", step_ckpt=1, description="truncated MAML (last T inner steps back-propagated), every inner step checkpointed whole")
