"""second order with per-layer gradient checkpointing"""
from harness.variants import Variant

VARIANT = Variant("ckpt", layer_ckpt=True, description="second order with per-layer gradient checkpointing")
