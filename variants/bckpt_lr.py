"""second order, learnable LR, binomial (Revolve) checkpointing over all inner steps"""
from harness.variants import AUTO_SNAPSHOTS, Variant

VARIANT = Variant("bckpt_lr", snapshots=AUTO_SNAPSHOTS, learn_lr=True, description="second order, learnable LR, binomial (Revolve) checkpointing over all inner steps")
