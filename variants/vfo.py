"""first-order MAML, fixed inner LR, tasks vectorized by torch.func.vmap"""
from harness.variants import Variant

VARIANT = Variant("vfo", first_order=True, vectorize=True, description="first-order MAML, fixed inner LR, tasks vectorized by torch.func.vmap")
