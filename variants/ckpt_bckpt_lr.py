"""second order, learnable LR, per-layer and binomial (Revolve) step checkpointing"""
from harness.variants import AUTO_SNAPSHOTS, Variant

VARIANT = Variant("ckpt_bckpt_lr", layer_ckpt=True, snapshots=AUTO_SNAPSHOTS, learn_lr=True, description="second order, learnable LR, per-layer and binomial (Revolve) step checkpointing")
