"""MAML: second order, fixed inner LR, no checkpointing (the reference)"""
from harness.variants import Variant

VARIANT = Variant("maml", description="MAML: second order, fixed inner LR, no checkpointing (the reference)")
