"""The keys of a strategy's ``user_defined_quantize_config`` (the pipeline keys are `qstrat.strategy.keys`).

- Handy keys, ``<family>_<suffix>``: one quantizer parameter for every
  quantizer of a family (``weight_bit=4`` sets ``bit_width`` on every weight
  quantizer that has it).
- Partition keys: which layers are inputs, outputs, left alone, or kept at
  another precision (``layer_config``).
"""

# Handy keys of user_defined_quantize_config: <family>_<suffix> -> quantizer parameter.
HANDY_FAMILIES = {"input": "input", "weight": "weight", "bias": "bias", "activation": "output"}
HANDY_SUFFIXES = {
    "bit": "bit_width",
    "method": "method",
    "method_percentile": "method_percentile",
    "symmetry": "symmetry",
    "per_channel": "per_channel",
    "round_mode": "round_mode",
    "unsigned": "unsigned",
    "narrow_range": "narrow_range",
}
HANDY_KEYS = {
    f"{fam}_{suf}": (target, param) for fam, target in HANDY_FAMILIES.items() for suf, param in HANDY_SUFFIXES.items()
}
PARTITION_KEYS = ("input_layers", "output_layers", "ignore_layers", "layer_config")
LAYER_CONFIG_DTYPES = ("int8", "int16", "float16", "bfloat16", "float32", "float64")
USER_KEYS = tuple(HANDY_KEYS) + PARTITION_KEYS
