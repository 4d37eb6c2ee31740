"""second order with learnable per-layer inner LRs (Meta-SGD / MAML++ style)"""
from harness.variants import Variant

VARIANT = Variant("lr", learn_lr=True, description="second order with learnable per-layer inner LRs (Meta-SGD / MAML++ style)")
