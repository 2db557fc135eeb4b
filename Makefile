# NaViL workbook — two commands: `make run` and `make test`.
# The bootstrap creates .venv (or refreshes it when pyproject.toml changes) and installs the CPU
# torch wheel first so pip never pulls a multi-GB CUDA build. Bring your own torch by setting
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124).

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.navil-installed
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX_URL ?=
PIP_FLAGS   ?= --disable-pip-version-check --quiet
# Pinned versions of every dependency (figures are byte-identical only with the same matplotlib, …);
# `make CONSTRAINTS= run` lifts the pins.
CONSTRAINTS ?= constraints.txt

.PHONY: run test unit nbval lab lab-check train-tiny-small-encoder train-tiny-gen2 train-tiny-gen1 venv clean-venv train-tiny check-portable constraints help

help:
	@echo "make run    - set up .venv if needed, execute every notebook, regenerate figures/"
	@echo "make test   - set up .venv if needed, unit tests + pytest --nbval over notebooks/"
	@echo "make lab    - JupyterLab on the project's kernel"
	@echo "make lab-check - run every notebook through JupyterLab in headless Chromium; screenshots to figures/lab/"
	@echo "make check-portable - re-run notebooks + nbval under other CPU kernel sets / thread counts (~10 min)"
	@echo "make train-tiny - reproduce the embedded tiny NaViL (second generation) from scratch (about 6 h on 2 CPU cores)"
	@echo "make train-tiny-gen1 - the first generation's recipe (not shipped; chapter 04's encoder-size pair uses it)"
	@echo "make train-tiny-small-encoder - the first generation's recipe with a 7.4x smaller vision encoder (~2 h on 2 CPU cores)"
	@echo "make train-tiny-gen2 - gen 2's first attempt, not shipped (token loss from a random encoder; about 3 h on 2 idle CPU cores)"

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "==> bootstrapping $(VENV) (python: $$($(PYTHON_BOOT) --version))"
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install $(PIP_FLAGS) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	@$(PY) -m pip install $(PIP_FLAGS) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	@touch $(STAMP)
	@echo "==> $(VENV) ready: $$($(PY) -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"

# REFRESH=1 also re-records the live timing cells (# NBVAL_IGNORE_OUTPUT), which otherwise keep
# their saved output so that an unchanged tree stays clean.
run: $(STAMP)
	@$(PY) -m navil_utils.workbook.run_notebooks notebooks $(if $(REFRESH),--refresh-volatile)

unit: $(STAMP)
	@$(PY) -m pytest tests -q

nbval: $(STAMP)
	@NAVIL_FIGURES_DIR=$$(mktemp -d) $(PY) -m pytest notebooks -q --nbval --nbval-current-env \
	  --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 900

# Tests write the notebooks' figures to a scratch folder: figures/ is `make run`'s to regenerate, and a PNG's
# bytes can differ between CPUs' float kernels, so a test run must not touch it.
test: $(STAMP)
	@NAVIL_FIGURES_DIR=$$(mktemp -d) $(PY) -m pytest -q tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 900

# Saved outputs and figures must not depend on the CPU: re-execute and nbval-test the notebooks under
# restricted float kernels (AVX2, generic+SSE) and 1/2 threads; the committed tree must stay unchanged.
check-portable: $(STAMP)
	@PY=$(PY) bash .ci/portability

# JupyterLab reads jupyter/overrides.json from the environment's lab settings directory: no news
# pop-up and no update check (the workbook runs offline).
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings

lab: $(STAMP)
	@mkdir -p $(LAB_SETTINGS) && cp jupyter/overrides.json $(LAB_SETTINGS)/overrides.json
	@$(PY) -m jupyter lab --notebook-dir=notebooks

# Every numbered notebook opened in JupyterLab (headless Chromium via Playwright), Run All from the menu,
# errors/stderr/missing figures/unrendered or cut-off widgets fail, each control moved once. Needs Debian's
# `chromium` (or CHROMIUM=/path/to/chrome); Playwright itself is installed on first use.
LAB_SHOTS ?= figures/lab
lab-check: $(STAMP)
	@$(PY) -c "import playwright" 2>/dev/null || \
	  $(PY) -m pip install $(PIP_FLAGS) $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[lab]"
	@$(PY) -m navil_utils.workbook.lab_check --shots $(LAB_SHOTS)

# Reproduce data/models/navil-tiny from scratch (second generation, data/models/navil-tiny/README.md): stage 0
# pretrains the encoder on the per-token targets alone (skipped when its export exists); stages 1-2 train the
# whole model; stages 3-7 are the relation curriculum (word subsets, then weighted words, then the auxiliary
# position loss); stage 8 adds glyph supervision on text-dense scenes. The shipped weights were trained this
# way on 2 CPU cores (about 5.5 h in all); add
# TRAIN_ARGS="--device cuda --set num_workers=14" on a GPU machine. Killed runs resume where they stopped.
TRAIN_ARGS ?=
GEN2_STAGES := 1 2 3 4 5 6 7
train-tiny: $(STAMP)
	@test -f runs/navil-tiny-gen2b/stage0/model.safetensors || $(PY) -m navil_utils.tiny.encoder_capacity \
	  --model '{"llm_intermediate": 384}' --steps 1000 --eval-every 250 \
	  --target-weights '{"kind": 1, "color": 0.1, "glyph": 0}' --save runs/navil-tiny-gen2b/stage0 \
	  --out runs/navil-tiny-gen2b/stage0.jsonl
	@set -e; for stage in $(GEN2_STAGES); do \
	  $(PY) -m navil_utils.train --out runs/navil-tiny-gen2b/stage$$stage --config configs/tiny_gen2b_stage$$stage.json $(TRAIN_ARGS); \
	done
	$(PY) -m navil_utils.train --out runs/navil-tiny-gen2b/stage8 --config configs/tiny_gen2b_stage8.json \
	  --ship data/models/navil-tiny $(TRAIN_ARGS)

# The first generation (data/models/navil-tiny/gen1/README.md; trained on one H200 in 6 + 3.3 minutes, ~8 h on
# a 2-core CPU); chapter 04's encoder-size comparison uses this recipe. Not shipped: runs/navil-tiny/stage2/final.
train-tiny-gen1: $(STAMP)
	$(PY) -m navil_utils.train --out runs/navil-tiny/stage1 --config configs/tiny_stage1.json $(TRAIN_ARGS)
	$(PY) -m navil_utils.train --out runs/navil-tiny/stage2 --config configs/tiny_stage2.json $(TRAIN_ARGS)

# The embedded recipe with an 8x smaller vision encoder (configs/attention/README.md), for chapter 04.
train-tiny-small-encoder: $(STAMP)
	$(PY) -m navil_utils.train --out runs/navil-tiny-small-encoder/stage1 --config configs/attention/small_encoder_stage1.json $(TRAIN_ARGS)
	$(PY) -m navil_utils.train --out runs/navil-tiny-small-encoder/stage2 --config configs/attention/small_encoder_stage2.json $(TRAIN_ARGS)

# The second-generation recipe (configs/README.md): the embedded recipe plus the auxiliary per-token loss,
# per-question loss averaging and a down-scaled connector init. Resumable like every run.
train-tiny-gen2: $(STAMP)
	$(PY) -m navil_utils.train --out runs/navil-tiny-gen2/stage1 --config configs/tiny_gen2_stage1.json $(TRAIN_ARGS)
	$(PY) -m navil_utils.train --out runs/navil-tiny-gen2/stage2 --config configs/tiny_gen2_stage2.json $(TRAIN_ARGS)

# Re-pin constraints.txt to what .venv has now (after deliberately upgrading a dependency).
constraints: $(STAMP)
	@{ sed -n '1,/^# torch is installed first/p' constraints.txt; \
	   $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt && echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

clean-venv:
	rm -rf $(VENV)
