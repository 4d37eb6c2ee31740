"""Reptile: the update direction theta - phi_K of K plain SGD steps (not a gradient), unscaled"""
from harness.variants import Variant

VARIANT = Variant("reptile", estimator="reptile", description="Reptile: the update direction theta - phi_K of K plain SGD steps (not a gradient), unscaled")
