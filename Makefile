# Entry points for a fresh clone. Everything lives in .venv/ at the project root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: setup system-deps demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	# test-only: the audio fbank parity test compares with torchaudio's kaldi.fbank; 2.11.1 (the newest) imports
	# beside the pinned torch but declares another torch, so it goes in without its dependencies
	$(PY) -m pip install -q --no-deps torchaudio==2.11.1
	touch $(STAMP)

## setup: create .venv and install the project (idempotent: a second run takes seconds)
setup: $(STAMP)

## system-deps: the Debian packages the cluster tests run for real (Slurm, munge, sshd) and the audio demo's
## speech synthesizer (espeak-ng); needs root.
## The tests that need them skip without them (CI sets UNIREPLKNET_REQUIRE_SLURM=1: they fail instead).
SYSTEM_PACKAGES := slurmctld slurmd slurm-client munge openssh-server rsync espeak-ng
system-deps:
	@if command -v sbatch >/dev/null && test -x /usr/sbin/slurmctld -a -x /usr/sbin/munged -a -x /usr/sbin/sshd && command -v rsync >/dev/null && command -v espeak-ng >/dev/null; then \
	    echo "system packages present"; \
	else \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

## demo: set up, then run the whole pipeline on embedded demo data, on a local Ray cluster: generated digit
## shards -> demo pretraining (DeepSpeed, CPU) -> export -> the fine-tunes from it, in parallel (generated sets) -> summary
demo: setup
	$(PY) -m cluster.pipeline --config demo

## test: set up, then run the test suite on TEST_WORKERS pytest-xdist workers (3 by default: many tests wait on
## subprocesses, so 3 keep 2 cores busy). Each test module runs whole on one worker, except that every test that
## starts a Ray cluster or a Slurm (marker ray_cluster) runs on one worker, one after another (tests/conftest.py).
## TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) .cache
