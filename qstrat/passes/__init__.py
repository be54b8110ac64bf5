"""Graph passes: optimize (float -> float), quantize (insert quantizers), calibrate, refine."""
