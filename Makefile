# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
ROWS   ?= 1000000

.PHONY: demo test bench bench-distributed clean pipeline-demo

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

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.bench-installed
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/imbalance.py
	$(BIN)/python benchmarks/recall.py
	$(BIN)/python benchmarks/retrieval.py   # MovieLens-100K recall (downloads the recbole wheel)

# Loopback clusters (1 vs 2 workers, parameter servers), Beam vs tf.data scoring, memory.
bench-distributed: $(BIN)/.installed
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) $(DEMO) runs .pytest_cache

# The TF Serving-compatible server on the exports in saved_models/ (gRPC 8500, REST 8501).
.PHONY: serve bench-serving
serve: $(BIN)/.installed
	$(BIN)/fm-keras serve --port=8500 --rest_api_port=8501 \
		--model_config_file=serving/models.local.config --file_system_poll_wait_seconds=5 \
		--monitoring_config_file=serving/monitoring.config

# Load benchmark; uses h2load (apt-get install nghttp2-client) when on PATH, else Python clients.
bench-serving: $(BIN)/.installed
	$(BIN)/python benchmarks/serving_load.py
