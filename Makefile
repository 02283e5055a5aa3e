# Two entry points for a fresh machine (see README):
#   make demo   -- create .venv, install, train the 2-rank CPU demo
#   make test   -- create .venv, install, run the test suite
# torch is installed first and pinned (TORCH_SPEC): an open range on a machine with
# no torch would pull a multi-GB CUDA build. Set TORCH_SPEC="torch" on a GPU box.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,metrics,eval,triton,dali,deepspeed
PY := $(VENV)/bin/python
STAMP := $(VENV)/.partialfc-installed

.PHONY: install demo test clean-venv

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# DeepSpeed ships as an sdist that imports torch while building: build it against
	# the torch above (no isolated build env, which would fetch another torch).
	$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Each `make demo` trains anew: an earlier demo in runs/demo is moved to runs/demo/superseded_*
# (train.resume = never). ARGS="--resume auto" continues it instead.
demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m partialfc.train configs/demo.toml \
		--set train.resume=never $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
