"""Random mutations of the built-in strategies: a valid strategy or a ConfigError, nothing else."""

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstrat.errors import ConfigError
from qstrat.strategy import builtin_dict, load_strategy, parse_strategy

pytestmark = pytest.mark.portable

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["Conv2D", "Pof2SQuantizer", "Min_MSE", "HALF_UP", "pof2s", "conv_dense", ""]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data):
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            key = path[-1]
            action = data.draw(st.sampled_from(["replace", "delete", "rename", "insert", "duplicate"]))
            if action == "replace":
                parent[key] = data.draw(json_values)
            elif action == "delete":
                del parent[key]
            elif action == "rename" and isinstance(parent, dict):
                parent[data.draw(st.text(max_size=10))] = parent.pop(key)
            elif action == "insert" and isinstance(parent, dict):
                parent[data.draw(st.text(max_size=10))] = data.draw(json_values)
            elif action == "duplicate" and isinstance(parent, list):
                parent.append(copy.deepcopy(parent[key]))
        except (KeyError, IndexError, TypeError):
            continue
    return doc


@given(name=st.sampled_from(["pof2s", "fs", "tqt"]), data=st.data())
def test_mutated_builtins_load_or_raise_config_error(name, data):
    doc = _mutate(builtin_dict(name), data)
    for load in (lambda: parse_strategy(doc), lambda: load_strategy(name, doc)):
        try:
            s = load()
        except ConfigError:
            continue
        # Whatever loads must dump to JSON and load back to the same strategy.
        again = parse_strategy(json.loads(json.dumps(s.to_dict())))
        assert again == s
