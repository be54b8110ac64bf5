"""Error types of qstrat.

Every error a user can provoke with bad input is one of these. Messages say
where the problem is, what was received, what was expected, and how to fix it:

    ConfigError: Pof2SQuantizer.bit_width: expected an integer in [1, 16], got 0.

`ConfigError.with_prefix` lets an outer loader (a strategy file, say) put its
own JSON path in front of the path a quantizer reported.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any


class QstratError(Exception):
    """Base class of every error qstrat raises on purpose."""


def describe(value: Any) -> str:
    """Show a received value the way a user wrote it, with its type when that matters (at most 200 characters
    of it)."""
    if isinstance(value, str):
        return f'"{_short(value)}" (a string)'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"{_short(repr(list(value)))} (a list)"
    if isinstance(value, dict):
        return "an object"
    shown = repr(value)
    return shown if len(shown) <= _SHOWN else f"{_short(shown)} (a {type(value).__name__})"


_SHOWN = 200


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}..."


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return a 'Did you mean "x"?' hint for a misspelt key or value, or None."""
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f'Did you mean "{lowered[word.lower()]}"? Names are case-sensitive.'
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f'Did you mean "{close[0]}"?' if close else None


class ConfigError(QstratError, ValueError):
    """A configuration value is wrong: a quantizer parameter, a strategy key, an override.

    Args:
        path: where the value sits, e.g. ``"Pof2SQuantizer.bit_width"`` or a JSON path
            such as ``"$.quantize_registry_config.layer_quantize_config[3]..."``.
        problem: what is wrong, e.g. ``"expected an integer in [1, 16], got 0"``.
        hint: how to fix it, optional.
    """

    def __init__(self, path: str, problem: str, hint: str | None = None):
        self.path = path
        self.problem = problem
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        text = f"{self.path}: {self.problem}." if self.path else f"{self.problem}."
        return f"{text} {self.hint}" if self.hint else text

    def with_prefix(self, prefix: str) -> ConfigError:
        """Return the same error located under ``prefix`` (a parent path)."""
        path = f"{prefix}.{self.path}" if self.path else prefix
        return type(self)(path, self.problem, self.hint)

    @classmethod
    def expected(cls, path: str, what: str, got: Any, hint: str | None = None) -> ConfigError:
        return cls(path, f"expected {what}, got {describe(got)}", hint)

    @classmethod
    def unknown_key(cls, path: str, key: str, allowed: Iterable[str]) -> ConfigError:
        allowed = sorted(allowed)
        hint = did_you_mean(key, allowed) or f"Allowed keys: {', '.join(allowed)}."
        return cls(path, f'unknown key "{key}"', hint)


class CalibrationDataError(QstratError, ValueError):
    """Calibration data cannot be used: NaN or Inf values, a wrong shape or dtype, no data."""


class UnsupportedError(QstratError, ValueError):
    """A request is well formed but qstrat cannot do it (say, a statistic for an empty observer)."""


class PendingKeyWarning(UserWarning):
    """A strategy key is set, but qstrat does not act on it yet (the warning says what is missing)."""


def one_line(error: Exception) -> str:
    """An error's message on one line: Keras's "Arguments received" block and TensorFlow's node tags left out."""
    text = str(error).split("Arguments received")[0]
    text = re.sub(r"\x1b\[[0-9;]*m|\{\{[^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]", "", text)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


_PACKAGE = __file__.rsplit("/", 1)[0] + "/"


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn``, attributed to the first frame outside qstrat (the user's line), however deep in qstrat
    it is raised: one warning reached from several public calls at several depths."""
    import sys
    import warnings

    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        if frame.f_code.co_filename.endswith("_test.py"):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
