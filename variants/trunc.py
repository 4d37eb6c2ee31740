"""truncated MAML: back-propagation through the last T inner steps only (--set truncate_steps=T, default 1), the earlier ones first order"""
from harness.variants import Variant

VARIANT = Variant("trunc", estimator="truncated", description="truncated MAML: back-propagation through the last T inner steps only (--set truncate_steps=T, default 1), the earlier ones first order")
