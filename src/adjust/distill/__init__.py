"""Distilling the joint sampler from the base's own exact joint sampling (docs/method.md section 5)."""
