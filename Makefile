# Label Studio ML backend (Gemini drafts, YOLO fallback, retraining). `make help` lists the targets.
#
# PORT, WORKERS, THREADS and REDIS_URL reach scripts/run.sh only when set on the command line or in
# the environment (make passes those on by itself); otherwise run.sh reads them from .env or falls
# back to the same defaults as below.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PORT ?= 9090
WORKERS ?= 2
THREADS ?= 8
REDIS_URL ?= redis://127.0.0.1:6379/0
# Redis of the test suite (tests/conftest.py reads TEST_REDIS_URL; db 15 of the local Redis).
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
export TEST_REDIS_URL
# Label Studio 1.23.2 for the end-to-end tests lives in its own cached venv (the tests create it).
LS_VENV ?= $(HOME)/.cache/lsb/ls-venv-1.23.2
export LS_VENV
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements.stamp
LOCK_VENV := .venv-lock
AUDIT_VENV := .venv-audit

.PHONY: help install run lint test test-fast bench bench-full lock audit redis clean distclean

help:
	@echo "make install    create $(VENV) and install the dev lock (runtime + OWL-ViT extra + tests/lint/bench; only when it changed)"
	@echo "make run        run the service in the foreground: gunicorn on :$(PORT) + one rq worker (scripts/run.sh)"
	@echo "make lint       ruff and the import contract (lint-imports, .importlinter)"
	@echo "make test       make lint, then the whole test suite, end-to-end tests included (needs Redis; starts one if none answers)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make bench      benchmarks (python -m bench, about an hour; writes BENCHMARKS.md)"
	@echo "make bench-full also the long ones: training recipe, active learning (python -m bench --full)"
	@echo "make lock       regenerate the locks (requirements.txt, -owlvit.txt, -dev.txt) from their .in files in a throwaway venv"
	@echo "make audit      check the pinned requirements for known vulnerabilities (pip-audit)"
	@echo "make clean      remove caches and runtime files (keeps var/models, var/data and $(VENV))"
	@echo "make distclean  clean, and remove $(VENV)"

# --- environment ----------------------------------------------------------------------------------
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Three locks, each on top of the one before (same pins where they overlap): requirements.txt is the
# runtime (what the Docker image installs), requirements-owlvit.txt adds the optional OWL-ViT/SAM source,
# requirements-dev.txt adds tests, lint, fuzzing and bench. Development installs all three.
LOCKS := requirements.txt requirements-owlvit.txt requirements-dev.txt

# --no-deps: the locks pin the whole tree, and pip must not resolve it again. Ultralytics asks for the
# GUI OpenCV (opencv-python, needs libGL) and label-studio-sdk for the headless one; both install into
# the same cv2/ folder, so the lock keeps only opencv-python-headless and nothing may pull the other
# back. A venv made before that still holds the GUI one: remove it and lay the headless one again.
# scripts/check_env.py then fails on a missing dependency or a second OpenCV.
$(STAMP): $(LOCKS) pyproject.toml | $(BIN)/python
	if $(BIN)/python -m pip show -q opencv-python 2>/dev/null; then \
	    $(BIN)/python -m pip uninstall -y opencv-python && \
	    $(BIN)/python -m pip install --progress-bar off --no-deps --force-reinstall $$(grep '^opencv-python-headless==' requirements.txt); \
	fi
	$(BIN)/python -m pip install --progress-bar off --no-deps -r requirements-dev.txt
	$(BIN)/python -m pip install --progress-bar off --no-deps -e .   # the `lsb` command
	$(BIN)/python scripts/check_env.py
	touch $(STAMP)

install: $(STAMP)

# --- run ------------------------------------------------------------------------------------------
run: install
	VENV="$(abspath $(VENV))" bash scripts/run.sh

# --- tests ----------------------------------------------------------------------------------------
# The tests' Redis: started by scripts/redis.sh when none answers (the same code as make run's; it
# installs redis-server with apt-get when missing and root). It keeps running after the tests.
redis: install
	VENV="$(abspath $(VENV))" bash scripts/redis.sh '$(TEST_REDIS_URL)'

# --- lint -----------------------------------------------------------------------------------------
# ruff (rules in pyproject.toml) and the layer contract (.importlinter). Both run; either failing fails.
lint: install
	status=0; $(BIN)/ruff check . || status=1; $(BIN)/lint-imports || status=1; exit $$status

test: install redis lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: install redis
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench

bench-full: install
	$(BIN)/python -m bench --full

# --- dependencies ---------------------------------------------------------------------------------
# Resolve the three .in files in one throwaway venv, each on top of the pins before it (passed as
# constraints, so no later lock re-pins an earlier one), and write to each lock only the packages its
# step added. The leading comment and `-r` lines of each lock are kept, the pins sorted
# case-insensitively (stable diffs).
LOCK_NEW := $(LOCK_VENV)/bin/python -c 'import re, sys; name = lambda line: re.sub(r"[-_.]+", "-", line.split("==")[0].strip()).lower(); \
	pinned = {name(line) for path in sys.argv[1:] for line in open(path) if "==" in line}; \
	sys.stdout.writelines(sorted((line for line in sys.stdin if name(line) not in pinned), key=str.lower))'
# Never pinned: the GUI OpenCV that Ultralytics asks for (libGL; it shares cv2/ with the headless one
# label-studio-sdk needs, which Ultralytics runs on just as well). make install uses --no-deps.
# pip and wheel are the installer's own (setuptools is pinned: torch requires it at run time).
LOCK_DROP := opencv-python|opencv-contrib-python|pip|wheel
define lock_step
	$(LOCK_VENV)/bin/python -m pip install --progress-bar off -r $(1:.txt=.in) $(foreach f,$(2),-c $(f).pins)
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^($(LOCK_DROP))==' | $(LOCK_NEW) $(foreach f,$(2),$(f).pins) > $(1).pins
	{ sed -n '/^\(#\|-r \)/!q;p' $(1) 2>/dev/null || true; cat $(1).pins; } > $(1).new
endef

lock:
	rm -rf $(LOCK_VENV) $(addsuffix .new,$(LOCKS)) $(addsuffix .pins,$(LOCKS))
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call lock_step,requirements.txt,)
	$(call lock_step,requirements-owlvit.txt,requirements.txt)
	$(call lock_step,requirements-dev.txt,requirements.txt requirements-owlvit.txt)
	grep -q '^torch==' requirements.txt.new
	grep -q '^transformers==' requirements-owlvit.txt.new
	grep -q '^pytest==' requirements-dev.txt.new
	for f in $(LOCKS); do mv $$f.new $$f; done
	rm -rf $(LOCK_VENV) $(addsuffix .pins,$(LOCKS))
	@echo "$(LOCKS) regenerated: review the diff, then make install"

# pip-audit lives in its own venv so it does not change the locked environment. The locks are fully
# pinned, so pip-audit checks the pins as written (--no-deps --disable-pip) without installing them;
# it does not follow `-r` includes then, so each lock is named.
audit:
	test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/python -m pip install pip-audit; }
	$(AUDIT_VENV)/bin/pip-audit $(addprefix -r ,$(LOCKS)) --no-deps --disable-pip --strict --progress-spinner off

# --- cleaning -------------------------------------------------------------------------------------
clean:
	rm -rf var/run var/ultralytics .pytest_cache $(LOCK_VENV) $(AUDIT_VENV) $(addsuffix .new,$(LOCKS)) $(addsuffix .pins,$(LOCKS))
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
