"""first order with learnable per-layer inner LRs"""
from harness.variants import Variant

VARIANT = Variant("lr_fo", learn_lr=True, first_order=True, description="first order with learnable per-layer inner LRs")
