# sar_exp developer commands. `make help` lists them.
PYTHON ?= .venv/bin/python
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-slow lint format run bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-12s %s\n", $$1, $$2}'

install: ## create .venv in the repo and install sar_exp with its dev tools (CPU torch 2.13.0)
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet "torch==2.13.0"
	.venv/bin/pip install --quiet -e ".[dev]"

test: ## run the test suite (fast tests; under 10 minutes on 2 cores)
	$(PYTHON) -m pytest -q

test-slow: ## run only the long tests (marked slow)
	$(PYTHON) -m pytest -q -m slow

lint: ## ruff check and format check
	$(PYTHON) -m ruff check sar_exp tests
	$(PYTHON) -m ruff format --check sar_exp tests

format: ## apply ruff fixes and formatting
	$(PYTHON) -m ruff check --fix sar_exp tests
	$(PYTHON) -m ruff format sar_exp tests

run: ## one default training run (synthetic data, SASRec, plain backbone); ARGS="key=value ..." to override
	$(PYTHON) -m sar_exp $(ARGS)

bench: ## preprocessing and training-throughput benchmark on the kuaisar_scale preset
	$(PYTHON) -m sar_exp.bench $(ARGS)

clean: ## remove caches and run outputs (keeps .venv and the paper tables' cells in outputs/tables)
	rm -rf .cache multirun
	find outputs -mindepth 1 -maxdepth 1 ! -name tables ! -name .gitkeep -exec rm -rf {} +
	touch outputs/.gitkeep

# ClardRec's Table 1 and Table 2. DATASET=kuaisar DATA=DIR for the real data;
# QUICK=1 for one seed and two epochs; SEEDS="0 1 2 3 4" for the paper's five seeds;
# JOBS=N runs N at a time (default: one per core), each on THREADS threads (default 1,
# whatever JOBS is, so the tables do not depend on the scheduling); BACKBONES="mlp mmoe"
# and VARIANTS="base clardrec -CD" run part of the grid.
DATASET ?= synthetic
SEEDS ?= 0 1 2
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
THREADS ?= 1
.PHONY: table-clardrec
table-clardrec: ## ClardRec Table 1 + 2 over seeds beside the paper's numbers (DATASET=, DATA=, SEEDS=, JOBS=, THREADS=, QUICK=1, BACKBONES=, VARIANTS=)
	$(PYTHON) -m sar_exp.tables.clardrec --dataset $(DATASET) $(if $(DATA),--data $(DATA)) --seeds $(SEEDS) --jobs $(JOBS) --threads $(THREADS) $(if $(QUICK),--quick) $(if $(BACKBONES),--backbones $(BACKBONES)) $(if $(VARIANTS),--variants $(VARIANTS))

# UniSAR's Table 3, 4 and 5. DATASET=kuaisar|amazon DATA=DIR for the real data; the
# other switches as for table-clardrec (VARIANTS="SASRec JSR UniSAR" runs part of it).
.PHONY: table-unisar
table-unisar: ## UniSAR Table 3 + 4 + 5 over seeds beside the paper's numbers (DATASET=, DATA=, SEEDS=, JOBS=, THREADS=, QUICK=1, VARIANTS=)
	$(PYTHON) -m sar_exp.tables.unisar --dataset $(DATASET) $(if $(DATA),--data $(DATA)) --seeds $(SEEDS) --jobs $(JOBS) --threads $(THREADS) $(if $(QUICK),--quick) $(if $(VARIANTS),--variants $(VARIANTS))

# QueryRec's Table 4 and 5 (task=ctr). DATASET=kuaisar DATA=DIR RELEASE=small|large for
# the real data; the other switches as for table-clardrec.
.PHONY: table-queryrec
table-queryrec: ## QueryRec Table 4 + 5 over seeds beside the published numbers (DATASET=, DATA=, RELEASE=, SEEDS=, JOBS=, THREADS=, QUICK=1, VARIANTS=)
	$(PYTHON) -m sar_exp.tables.queryrec --dataset $(DATASET) $(if $(DATA),--data $(DATA)) $(if $(RELEASE),--release $(RELEASE)) --seeds $(SEEDS) --jobs $(JOBS) --threads $(THREADS) $(if $(QUICK),--quick) $(if $(VARIANTS),--variants $(VARIANTS))

# SESRec's Table 2, 3 and 4. DATASET=kuaisar|amazon DATA=DIR for the real data; the
# other switches as for table-clardrec (VARIANTS="SASRec SESRec base plus_ali" runs part of it).
.PHONY: table-sesrec
table-sesrec: ## SESRec Table 2 + 3 + 4 over seeds beside the published numbers (DATASET=, DATA=, SEEDS=, JOBS=, THREADS=, QUICK=1, VARIANTS=)
	$(PYTHON) -m sar_exp.tables.sesrec --dataset $(DATASET) $(if $(DATA),--data $(DATA)) --seeds $(SEEDS) --jobs $(JOBS) --threads $(THREADS) $(if $(QUICK),--quick) $(if $(VARIANTS),--variants $(VARIANTS))
