"""implicit MAML (iMAML): proximal inner loop, meta-gradient by conjugate gradient on (I + H/lambda) v = g (--set implicit_lambda, cg_steps)"""
from harness.variants import Variant

VARIANT = Variant("imaml", estimator="implicit", description="implicit MAML (iMAML): proximal inner loop, meta-gradient by conjugate gradient on (I + H/lambda) v = g (--set implicit_lambda, cg_steps)")
