"""first order, learnable per-layer inner LRs, tasks vectorized by torch.func.vmap"""
from harness.variants import Variant

VARIANT = Variant("vlr_fo", learn_lr=True, first_order=True, vectorize=True, description="first order, learnable per-layer inner LRs, tasks vectorized by torch.func.vmap")
