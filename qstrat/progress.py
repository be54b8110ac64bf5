"""Progress of a long call: each stage's name and wall time, and a bar for each pass over the data.

`quantize_model` runs its stages inside one `Progress`. With ``verbose=0``
nothing is printed; the times and the number of passes over the
calibration data are recorded either way (``Quantizer.timings``).

Example:
    progress = Progress(verbose=1)
    with progress.stage("calibrate activations"):
        bar = progress.data_pass(total=32, unit="batch")
        for k in range(32):
            bar.update(k + 1)
    progress.times   # {"calibrate activations": 1.2}
"""

from __future__ import annotations

import contextlib
import sys
import time


class _NoBar:
    def update(self, current: int) -> None:
        pass


class Progress:
    """Stage names and times, and progress bars, for one long call."""

    def __init__(self, verbose: int = 1, stream=None, data: str = "calibration data"):
        if not isinstance(verbose, int) or verbose < 0:  # True and False are 1 and 0
            from qstrat.errors import ConfigError

            raise ConfigError.expected("verbose", "0 (silent), 1 or 2", verbose)
        self.verbose = verbose
        self.data = data
        self.stream = stream
        self.times: dict[str, float] = {}
        self.data_passes = 0
        self._start = time.perf_counter()

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"qstrat: {text}", file=self.stream or sys.stdout, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage (added to ``times[name]``); say its name when it starts and its time when it ends."""
        if self.verbose > 1:
            self.say(f"{name} ...")
        t = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t
            self.times[name] = self.times.get(name, 0.0) + took
            self.say(f"{name}: {took:.2f} s")

    def data_pass(self, total: int | None, unit: str = "batch", passes: int = 1, what: str = ""):
        """Count ``passes`` passes over the calibration data and return a bar for them (``update(k)``)."""
        self.data_passes += passes
        if not self.verbose:
            return _NoBar()
        import keras

        first = self.data_passes - passes + 1
        which = f"pass {first}" if passes == 1 else f"passes {first}-{self.data_passes}"
        self.say(f"{which} over the {self.data}{': ' + what if what else ''}")
        return keras.utils.Progbar(total, unit_name=unit, verbose=self.verbose)

    def done(self, what: str) -> float:
        total = time.perf_counter() - self._start
        self.say(f"{what} in {total:.1f} s ({self.data_passes} passes over the calibration data)")
        return total
