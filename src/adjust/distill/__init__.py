"""Distilling the joint sampler from the base's own exact joint sampling (METHOD.md section 5)."""
