# The two commands of the README. Both create ./.venv on first use (scripts/setup.sh).
.PHONY: quickstart test bench

quickstart:
	bash scripts/setup.sh
	.venv/bin/align quickstart --output-dir outputs/quickstart

test:
	bash scripts/setup.sh dev
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench:
	bash scripts/setup.sh dev
	.venv/bin/python bench/dpo_vs_trl.py
