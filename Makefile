# `make demo` and `make test` set everything up themselves on a fresh machine (only the package
# registry needed): a .venv with the pinned stack, then the demo pipeline or the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
# Rules call `python -m workflow_scripts...`: make sure that python is the venv's.
export PATH := $(abspath $(BIN)):$(PATH)

# Where `make rehearsal` writes its stand-ins and results (about 70 GiB; `make clean-rehearsal`).
REHEARSAL_DIR ?= rehearsal

.PHONY: demo test test-hostile preflight rehearsal chaos bench lint dry-run clean-demo clean-rehearsal venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# The notebook rule runs papermill with kernel "python3": register the venv's own interpreter.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mlp-mixer)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/snakemake --configfile demo/config.yaml --cores $(CORES) --printshellcmds; \
	status=$$?; end=$$(date +%s); \
	echo "Demo finished in $$((end - start)) s (exit $$status)."; \
	test $$status -eq 0 && echo "Report: $(abspath demo_results/report/index.html)"; \
	exit $$status

# First on a new node: every GPU job shape checked on this node (memory and micro-batch, speed, DDP, loader,
# numerics) and the study's ETA from the measured rates (README "Preflight"). GPUS=N schedules the ETA on N
# GPUs, as `--resources gpu=N` will run the study (default: the GPUs the preflight sees).
GPUS ?=
preflight: $(STAMP)
	$(BIN)/snakemake --cores all $(if $(GPUS),--resources gpu=$(GPUS)) preflight

# The suite runs the rehearsal in its short form (the Mixer-B/16 checkpoints, up to the aggregate);
# `make rehearsal` runs the full one.
test: lint
	MIXER_REHEARSAL=short $(BIN)/python -m pytest

# The tests that met environment hazards, run from a fresh clone of HOSTILE_REV (default HEAD) under them: a GPU
# node, CUDA_VISIBLE_DEVICES="", an unreachable http_proxy, a 0700 parent folder, a checkout owned by another uid,
# a resolver that hijacks NXDOMAIN, a short browser window; CI=true. HAZARDS="proxy dns-hijack" picks some,
# HOSTILE_TESTS="tests/test_x.py" other tests (tests/hostile/run.sh).
HOSTILE_REV ?= HEAD
test-hostile: $(STAMP)
	bash tests/hostile/run.sh $(HOSTILE_REV)

# The real study (config.yaml) on stand-ins at the real shapes, every job, report included (README "Rehearsal").
rehearsal: $(STAMP)
	$(BIN)/python -m tests.rehearsal.harness --workdir $(REHEARSAL_DIR) --cores $(CORES)

# The whole demo while fine-tuning jobs, evaluation jobs and Snakemake are killed at random moments (6 faults;
# MIXER_CHAOS_SEED=<n> replays a run); the files must equal an uninterrupted run's. `make test` runs a short form.
chaos: $(STAMP)
	MIXER_CHAOS_FULL=1 $(BIN)/python -m pytest tests/test_chaos.py -s -q

# The study's progress at any moment, running or stopped: Table 3's cells with their state and figure, jobs,
# device-hours spent and left, the ETA (GPUS=<n>: on n GPUs; default: the preflight's); writes results/status.html.
.PHONY: status
status: $(STAMP)
	$(BIN)/python -m workflow_scripts.status --config config.yaml $(if $(GPUS),--gpus $(GPUS))

bench: $(STAMP)
	$(BIN)/python -m workflow_scripts.bench

lint: $(STAMP)
	$(BIN)/ruff check workflow_scripts tests
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n --cores all --resources gpu=2

clean-demo:
	rm -rf demo_results

clean-rehearsal:
	rm -rf $(REHEARSAL_DIR)
