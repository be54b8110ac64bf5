"""Refine: passes on the calibrated quantized model (bias correction)."""
