# Two entry points for a newcomer: `make run` (train + evaluate + build an index on the shipped
# EURLEX57K data) and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
RUN_DIR ?= runs

.PHONY: setup run test lint bench proto clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lives on the local package index; pin it before anything pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup
	$(VENV)/bin/elias train $(DATA)/eurlex57k $(RUN_DIR)/eurlex57k
	$(VENV)/bin/elias eval $(RUN_DIR)/eurlex57k $(DATA)/eurlex57k --split test --json $(RUN_DIR)/eurlex57k-test.json
	$(VENV)/bin/elias build-index $(RUN_DIR)/eurlex57k $(RUN_DIR)/eurlex57k-index --dtype fp16
	$(VENV)/bin/elias search $(RUN_DIR)/eurlex57k-index -k 10 "Regulation on the common organisation of the market in wine"

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

# Full-size benchmarks, one after another (each rewrites its own section of BENCHMARKS.md); run them on a quiet
# machine. The dtype, quality-vs-latency and gRPC quality runs use the model the EURLEX57K quality run trains.
bench: setup
	$(PY) bench/quality.py $(DATA)/eurlex57k --out $(RUN_DIR)/bench-eurlex57k
	$(PY) bench/quality.py $(DATA)/tibkat --out $(RUN_DIR)/bench-tibkat
	$(PY) bench/quality.py $(DATA)/xc/bibtex --out $(RUN_DIR)/bench-bibtex
	$(PY) bench/quality.py $(DATA)/xc/delicious --out $(RUN_DIR)/bench-delicious
	$(PY) bench/train_profile.py --data $(DATA)/tibkat
	$(PY) bench/encoders.py $(DATA)/eurlex57k --encoders tfidf,frozen,hybrid --out $(RUN_DIR)/bench-encoders
	for k in tfidf frozen hybrid; do $(VENV)/bin/elias build-index $(RUN_DIR)/bench-encoders/$$k $(RUN_DIR)/bench-encoders/$$k-index --quiet; done
	$(PY) bench/text_latency.py $(RUN_DIR)/bench-encoders/tfidf-index $(RUN_DIR)/bench-encoders/frozen-index $(RUN_DIR)/bench-encoders/hybrid-index
	$(PY) bench/add_labels.py --work $(RUN_DIR)/scratch-labels --full-model $(RUN_DIR)/bench-encoders/tfidf
	$(PY) bench/index_load.py --quality $(RUN_DIR)/bench-eurlex57k/model $(DATA)/eurlex57k
	$(PY) bench/recall_latency.py --model $(RUN_DIR)/bench-eurlex57k/model --data $(DATA)/eurlex57k
	$(VENV)/bin/elias build-index $(RUN_DIR)/bench-eurlex57k/model $(RUN_DIR)/bench-eurlex57k-index --quiet
	$(PY) bench/grpc_load.py --quality $(RUN_DIR)/bench-eurlex57k-index $(DATA)/eurlex57k
	$(PY) bench/fuzz_grpc.py
	$(PY) bench/serve_load.py
	$(PY) bench/hot_swap.py
	$(PY) bench/faults.py --model $(RUN_DIR)/bench-eurlex57k/model --work $(RUN_DIR)/scratch-faults
	$(PY) bench/index_load.py
	$(PY) bench/search_latency.py
	$(PY) bench/grpc_load.py
	$(PY) bench/scale.py

proto: setup
	$(PY) -m elias_retrieval.proto_gen

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .ruff_cache
