"""first order, learnable LR, binomial (Revolve) checkpointing over all inner steps"""
from harness.variants import AUTO_SNAPSHOTS, Variant

VARIANT = Variant("bckpt_lr_fo", snapshots=AUTO_SNAPSHOTS, learn_lr=True, first_order=True, description="first order, learnable LR, binomial (Revolve) checkpointing over all inner steps")
