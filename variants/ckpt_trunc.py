"""truncated MAML (last T inner steps back-propagated), per-layer checkpointing"""
from harness.variants import Variant

VARIANT = Variant("ckpt_trunc", estimator="truncated", layer_ckpt=True, description="truncated MAML (last T inner steps back-propagated), per-layer checkpointing")
