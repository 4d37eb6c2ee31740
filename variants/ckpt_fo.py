"""first order with per-layer gradient checkpointing"""
from harness.variants import Variant

VARIANT = Variant("ckpt_fo", layer_ckpt=True, first_order=True, description="first order with per-layer gradient checkpointing")
