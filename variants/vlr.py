"""second order, learnable per-layer inner LRs, tasks vectorized by torch.func.vmap"""
from harness.variants import Variant

VARIANT = Variant("vlr", learn_lr=True, vectorize=True, description="second order, learnable per-layer inner LRs, tasks vectorized by torch.func.vmap")
