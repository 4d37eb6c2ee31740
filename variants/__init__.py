"""Variant plugins: one module per variant, each declaring ``VARIANT = Variant(...)``.

Discovered by :func:`harness.variants.registry`; see that module for the rules.
"""
