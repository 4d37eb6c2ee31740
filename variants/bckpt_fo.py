"""first order, fixed inner LR, binomial (Revolve) checkpointing over all inner steps"""
from harness.variants import AUTO_SNAPSHOTS, Variant

VARIANT = Variant("bckpt_fo", snapshots=AUTO_SNAPSHOTS, first_order=True, description="first order, fixed inner LR, binomial (Revolve) checkpointing over all inner steps")
