# Local entry points (see README).
.PHONY: setup setup-vllm test nightly
setup:
	bash scripts/setup.sh
setup-vllm:
	bash scripts/setup_vllm_cpu.sh
test:
	.venv/bin/pytest -n 2 --dist loadgroup
nightly:  ## the GPU nightly sequence on this box (QUANTSUITE_MODEL, GPUS, COMPARE, QUANTSUITE_VLLM_PYTHON)
	bash scripts/nightly.sh
