"""Test-wide settings: quiet TensorFlow, a fixed hypothesis profile for CI, seeded tests, and on JAX a compilation cache.

Every test, and every module before its shared fixtures are built, starts
from the same seeds (Python's, NumPy's global generator and the backend's,
through `keras.utils.set_random_seed`): a model a test builds gets the same
initial weights on every run, so an assertion that holds for them holds
each time, and one that fails, fails each time.

On JAX, many tests build the same small models again (each fixture and
parametrization makes its own), and XLA compiles each one anew: a disk
cache for this session's compiled programs, keyed by the program, not by
the Keras objects, lets the repeats load them instead. It lives in a fresh
directory, removed when the session ends, so no run reuses another's. XLA
also compiles them without its LLVM optimizations: the tests' programs are
small and run once or a few times, so compiling is most of their time, and
five of the portable suite's heaviest files take a fifth less time on JAX
(225 against 285 s, one pytest run after the other). Those optimizations
keep IEEE float semantics (XLA's fast math is off either way), and the suite
passes with and without them; a run that sets its own `XLA_FLAGS` keeps
them as they are.
"""

import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "qstrat", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("qstrat")

_jax_cache = None


def _seed():
    import keras

    keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seeded_module():  # before a module's shared fixtures are built
    _seed()


@pytest.fixture(autouse=True)
def _seeded():
    _seed()


def pytest_configure(config):
    global _jax_cache
    if os.environ["KERAS_BACKEND"] != "jax" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    if "XLA_FLAGS" not in os.environ:  # read when JAX starts its CPU client, on first use
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    import jax

    _jax_cache = tempfile.mkdtemp(prefix="qstrat-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", _jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small models compile fast, repeat often
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if _jax_cache is not None:
        shutil.rmtree(_jax_cache, ignore_errors=True)
