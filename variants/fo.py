"""first-order MAML (FOMAML), fixed inner LR"""
from harness.variants import Variant

VARIANT = Variant("fo", first_order=True, description="first-order MAML (FOMAML), fixed inner LR")
