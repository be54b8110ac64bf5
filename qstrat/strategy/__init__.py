"""Quantize strategies: JSON data, validated once at the door, then immutable."""

from qstrat.strategy.keys import SECTIONS
from qstrat.strategy.load import (
    BUILTINS,
    builtin_dict,
    builtin_names,
    dump_quantize_strategy,
    load_strategy,
    names_a_file,
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


def keys_table_markdown() -> str:
    """The documentation table of every pipeline key (`qstrat.strategy.keys_doc`, imported here only when called,
    so that ``python -m qstrat.strategy.keys_doc`` runs it fresh)."""
    from qstrat.strategy.keys_doc import keys_table_markdown as table

    return table()


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
    "names_a_file",
    "parse_strategy",
    "read_strategy_file",
    "set_quantize_strategy",
    "explain",
    "resolve_views",
]
