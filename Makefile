# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
ROWS   ?= 1000000
# Test processes (pytest-xdist); each builds the session fixtures it needs. 1: one process.
TEST_WORKERS ?= 2

.PHONY: demo test bench bench-distributed clean pipeline-demo ab-demo

# The beam extra (batch scoring on Beam runners; its tests run in `make test`) moves protobuf
# to 6.x beside TF 2.20: see pyproject.toml.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,beam]'
	touch $@

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,beam,bench]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fm-keras synth --out $(DEMO)/data --rows $(ROWS)
	rm -rf $(DEMO)/run
	$(BIN)/fm-keras train --config $(DEMO)/data/experiment.yaml --out $(DEMO)/run
	$(BIN)/fm-keras evaluate --run $(DEMO)/run --data $(DEMO)/data/test.csv
	@echo "oracle (true probabilities) on the same test rows:"; cat $(DEMO)/data/oracle.json
	rm -rf $(DEMO)/saved_models
	$(BIN)/fm-keras export --run $(DEMO)/run --name ctr --base $(DEMO)/saved_models
	$(BIN)/fm-keras index --model $(DEMO)/saved_models/ctr --items $(DEMO)/data/items.csv \
	    --name ctr_recall --base $(DEMO)/saved_models --k 100
	$(BIN)/fm-keras index --model $(DEMO)/saved_models/ctr --items $(DEMO)/data/items.csv \
	    --name ctr_recall_bf --base $(DEMO)/saved_models --k 100 --backend brute_force
	$(BIN)/fm-keras score --model $(DEMO)/saved_models/ctr --input $(DEMO)/data/test.csv \
	    --output $(DEMO)/scores.parquet
	$(BIN)/fm-keras recommend --model $(DEMO)/saved_models/ctr_recall --users $(DEMO)/data/test.csv \
	    --k 10 --output $(DEMO)/recommendations.parquet
	$(BIN)/python -m fm_keras.serving.demo --base $(DEMO)/saved_models \
	    --users $(DEMO)/data/test.csv --items $(DEMO)/data/items.csv

# The retraining pipeline (pipelines/demo.yaml, docs/pipelines.md) on synthetic spans:
# span 1 pushes demo/pipeline/saved_models/ctr/1, span 2 pushes ctr/2, the rerun on unchanged
# inputs is served from the cache; span 3 (shuffled labels) is not blessed, span 4 (item_id
# renamed) fails validation (exit 1, ignored here); rollback to 1 and forward again.
# Reports: demo/pipeline/runs/*/report/index.html. Serve with:
#   fm-keras serve --model_config_file=demo/pipeline/models.config \
#       --model_config_file_poll_wait_seconds=5 --file_system_poll_wait_seconds=5
pipeline-demo: $(BIN)/.installed
	rm -rf demo/logs demo/pipeline
	$(BIN)/fm-keras synth --out demo/logs --span 1
	$(BIN)/fm-keras pipeline run pipelines/demo.yaml
	$(BIN)/fm-keras synth --out demo/logs --span 2
	$(BIN)/fm-keras pipeline run pipelines/demo.yaml
	$(BIN)/fm-keras pipeline run pipelines/demo.yaml
	$(BIN)/fm-keras synth --out demo/logs --span 3 --shuffle-labels
	$(BIN)/fm-keras pipeline run pipelines/demo.yaml
	$(BIN)/fm-keras synth --out demo/logs --span 4 --schema-change
	-$(BIN)/fm-keras pipeline run pipelines/demo.yaml
	$(BIN)/fm-keras pipeline rollback --pipeline pipelines/demo.yaml --name ctr --to 1
	$(BIN)/fm-keras pipeline rollback --pipeline pipelines/demo.yaml --name ctr --to latest
	$(BIN)/fm-keras pipeline status pipelines/demo.yaml

# The source's online experiment, reproduced (docs/experiments.md): two models on the same
# synthetic logs - naive (raw logs: cached exposures kept) and cleaned (the cached-exposure
# filter), both with the built-in defaults - exported as ctr/1 and ctr/2 with version labels
# naive and cleaned, indexed, and A/B tested 50/50 on the synthetic users with clicks drawn
# from the planted FM. Ends with the lift in clicks per user and its 95% CI (stderr) and the
# report JSON (stdout); the page: demo/ab/sim/report.html.
AB      ?= demo/ab
AB_ROWS ?= 300000
ab-demo: $(BIN)/.installed
	rm -rf $(AB)
	$(BIN)/fm-keras synth --out $(AB)/data --rows $(AB_ROWS)
	cp experiments/naive.yaml $(AB)/data/naive.yaml
	$(BIN)/fm-keras train --config $(AB)/data/naive.yaml --out $(AB)/runs/naive --quiet
	$(BIN)/fm-keras train --config $(AB)/data/experiment.yaml --out $(AB)/runs/cleaned --quiet
	$(BIN)/fm-keras export --run $(AB)/runs/naive --name ctr --base $(AB)/saved_models --version 1
	$(BIN)/fm-keras export --run $(AB)/runs/cleaned --name ctr --base $(AB)/saved_models --version 2
	for v in 1 2; do $(BIN)/fm-keras index --model $(AB)/saved_models/ctr/$$v \
	    --items $(AB)/data/items.csv --name ctr_recall --base $(AB)/saved_models --k 100 \
	    --backend brute_force --version $$v || exit 1; done
	sed 's|BASE|$(abspath $(AB))/saved_models|' experiments/ab-demo.models.config \
	    > $(AB)/models.config
	$(BIN)/fm-keras ab simulate --experiment experiments/ab-demo.yaml --base $(AB)/saved_models \
	    --model_config_file $(AB)/models.config --data $(AB)/data --out $(AB)/sim --cuped

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

bench: $(BIN)/.bench-installed
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/imbalance.py
	$(BIN)/python benchmarks/recall.py
	$(BIN)/python benchmarks/retrieval.py   # MovieLens-100K recall (downloads the recbole wheel)

# Loopback clusters (1 vs 2 workers, parameter servers), Beam vs tf.data scoring, memory.
bench-distributed: $(BIN)/.installed
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) $(DEMO) $(AB) runs .pytest_cache

# The TF Serving-compatible server on the exports in saved_models/ (gRPC 8500, REST 8501).
.PHONY: serve bench-serving
serve: $(BIN)/.installed
	$(BIN)/fm-keras serve --port=8500 --rest_api_port=8501 \
		--model_config_file=serving/models.local.config --file_system_poll_wait_seconds=5 \
		--monitoring_config_file=serving/monitoring.config

# Load benchmark; uses h2load (apt-get install nghttp2-client) when on PATH, else Python clients.
bench-serving: $(BIN)/.installed
	$(BIN)/python benchmarks/serving_load.py
