"""implicit MAML (iMAML), per-layer checkpointing of the Hessian-vector products"""
from harness.variants import Variant

VARIANT = Variant("ckpt_imaml", estimator="implicit", layer_ckpt=True, description="implicit MAML (iMAML), per-layer checkpointing of the Hessian-vector products")
