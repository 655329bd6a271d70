# mmr1 — the two commands of the README: `make demo` and `make test`. Both build .venv when it is missing
# or older than pyproject.toml, and reuse it otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MMR1 := $(VENV)/bin/mmr1
STAMP := $(VENV)/.mmr1-installed
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test demo demo-hybrid demo-data clean-demo bench bench-long

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

$(DEMO_DATA)/train.jsonl: | $(STAMP)
	$(MMR1) data synth --out $(DEMO_DATA)

demo-data: $(DEMO_DATA)/train.jsonl

demo: $(STAMP) $(DEMO_DATA)/train.jsonl
	$(MMR1) fit --config configs/demo.yaml
	$(MMR1) export --checkpoint $(DEMO_RUN)/checkpoints/last.ckpt --output $(DEMO_RUN)/export --overwrite
	$(MMR1) fit --config configs/demo_draft.yaml
	$(MMR1) export --checkpoint runs/demo_draft/checkpoints/last.ckpt --output runs/demo_draft/export --overwrite
	$(MMR1) evaluate --model $(DEMO_RUN)/export --manifest $(DEMO_DATA)/test.jsonl --output $(DEMO_RUN)/eval.json
	$(PY) examples/ask.py $(DEMO_RUN)/export $(DEMO_DATA)
	$(PY) examples/speculative.py $(DEMO_RUN)/export runs/demo_draft/export $(DEMO_DATA)

# the demo with sliding/hybrid attention (configs/profiles/demo_hybrid.yaml), into runs/demo_hybrid
demo-hybrid: $(STAMP) $(DEMO_DATA)/train.jsonl
	$(MMR1) fit --config configs/demo.yaml --config configs/profiles/demo_hybrid.yaml
	$(MMR1) export --checkpoint runs/demo_hybrid/checkpoints/last.ckpt --output runs/demo_hybrid/export --overwrite
	$(MMR1) evaluate --model runs/demo_hybrid/export --manifest $(DEMO_DATA)/test.jsonl \
		--output runs/demo_hybrid/eval.json

clean-demo:
	rm -rf $(DEMO_RUN) runs/demo_draft

bench: $(STAMP) bench-long $(DEMO_DATA)/train.jsonl
	$(PY) -m benchmarks.moe --out benchmarks/results/moe_cpu
	$(PY) -m benchmarks.moe_backward --out benchmarks/results/moe_backward
	$(PY) -m benchmarks.moe_padding --out benchmarks/results/moe_padding
	$(PY) -m benchmarks.host_memory --out benchmarks/results/host_memory
	$(PY) -m benchmarks.fused_adamw_fit --steps 16 --out benchmarks/results/fused_adamw_fit
	$(PY) -m benchmarks.engine --out benchmarks/results/engine
	$(PY) -m benchmarks.attention_groups --rounds 5 --out benchmarks/results/attention_groups
	$(PY) -m benchmarks.decode_attention --out benchmarks/results/decode_attention
	$(PY) -m benchmarks.prepack --out benchmarks/results/prepack
	$(PY) -m benchmarks.cpu_linear --out benchmarks/results/cpu_linear
	$(PY) -m benchmarks.moe_few_tokens --out benchmarks/results/moe_few_tokens
	$(PY) -m benchmarks.prefix_cache --out benchmarks/results/prefix_cache
	$(PY) -m benchmarks.async_fronts --out benchmarks/results/async_fronts

# full vs sliding vs hybrid attention at 1K-64K tokens, KV cache and decode at 16K (~13 min on 2 shared cores)
bench-long: $(STAMP)
	$(PY) -m benchmarks.long_context --out benchmarks/results/long_context
