"""truncated MAML with learnable per-layer inner LRs (--set truncate_steps=T, default 1)"""
from harness.variants import Variant

VARIANT = Variant("lr_trunc", estimator="truncated", learn_lr=True, description="truncated MAML with learnable per-layer inner LRs (--set truncate_steps=T, default 1)")
