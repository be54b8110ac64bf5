"""Quantize strategies: JSON data, validated once at the door, then immutable."""

from qstrat.strategy.keys import SECTIONS, keys_table_markdown
from qstrat.strategy.load import (
    BUILTINS,
    builtin_dict,
    builtin_names,
    dump_quantize_strategy,
    load_strategy,
    read_strategy_file,
    set_quantize_strategy,
)
from qstrat.strategy.parse import parse_strategy
from qstrat.strategy.resolve import LayerQuantConfig, ResolvedTarget, explain, resolve_views
from qstrat.strategy.schema import (
    InputQuantizeConfig,
    LayerPattern,
    PatternRef,
    QuantizerSpec,
    QuantTarget,
    Strategy,
    UserConfig,
)

__all__ = [
    "BUILTINS",
    "SECTIONS",
    "InputQuantizeConfig",
    "LayerQuantConfig",
    "ResolvedTarget",
    "LayerPattern",
    "PatternRef",
    "QuantTarget",
    "QuantizerSpec",
    "Strategy",
    "UserConfig",
    "builtin_dict",
    "builtin_names",
    "dump_quantize_strategy",
    "keys_table_markdown",
    "load_strategy",
    "parse_strategy",
    "read_strategy_file",
    "set_quantize_strategy",
    "explain",
    "resolve_views",
]
