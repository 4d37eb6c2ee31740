"""MAML (second order, fixed inner LR), binomial (Revolve) checkpointing over all inner steps, ceil(log2 K) stored states"""
from harness.variants import AUTO_SNAPSHOTS, Variant

VARIANT = Variant("bckpt", snapshots=AUTO_SNAPSHOTS, description="MAML (second order, fixed inner LR), binomial (Revolve) checkpointing over all inner steps, ceil(log2 K) stored states")
