"""quantsuite's command-line options, as a pytest plugin (part of quantsuite.plugin, the pytest layer).

Registered through the `pytest11` entry point (pyproject.toml), so pytest knows the options whatever it
chooses as rootdir; the root conftest also lists it in `pytest_plugins` for a checkout that is not installed.

Why a plugin: pytest picks its rootdir and ini file *before* it loads any conftest, from the arguments it
cannot attribute to an option it knows. `--model /models/Qwen2.5-VL-3B-Instruct` (an existing path outside
the project, given as a separate argument) was therefore taken as a test path: rootdir became `/models`, the
root conftest never loaded and pytest answered `unrecognized arguments: --scheme`. The ini file is already
chosen when any plugin runs, so `repair_split_paths` restarts pytest once with those values joined
(`--model=/models/...`), which pytest reads correctly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from quantsuite import REPORTS_DIR
from quantsuite.cache import default_cache_root
from quantsuite.stages.research import STUDIES, ResearchSettings

# Options that take a value; a value that is an existing path confuses pytest's rootdir choice (docstring).
VALUE_OPTIONS = ("--scheme", "--model", "--device", "--dtype", "--calib-data", "--batch-size", "--seq-len",
                 "--calib-samples", "--images-dir", "--score-samples", "--eval-samples", "--data-seed", "--model-seed",
                 "--cache-dir", "--vllm-python", "--run-id", "--reports-dir", "--research-studies",
                 "--research-score-sizes", "--research-draws")  # fmt: skip
RESTARTED = "QUANTSUITE_PYTEST_ARGS_JOINED"
# The options that say what a run computes on: the model (and device, dtype) and the data. A pytest run a test starts
# on the run's cache gets them all (`run_input_arguments`), or it keys, finds and builds other artifacts.
RUN_INPUT_OPTIONS = ("--model", "--device", "--dtype", "--model-seed", "--calib-data", "--images-dir", "--image-size",
                     "--batch-size", "--seq-len", "--calib-samples", "--score-samples", "--eval-samples",
                     "--data-seed")  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantsuite")
    add = group.addoption
    add("--scheme", action="append", default=[], help="Scheme name or alias from schemes.yaml (repeatable; all)")
    add(
        "--model",
        default="tiny",
        help="tiny (default), qwen2.5-vl-3b-shape, qwen2.5-vl-7b-shape "
        "(random weights, real architecture), or a local Qwen2.5-VL model directory",
    )
    add("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    add("--dtype", default="bfloat16", help="bfloat16, the one dtype export and reload support end to end")
    add("--calib-data", default=None, help="COCO captions annotation JSON (default: the bundled captions)")
    add("--images-dir", default=None,
        help="Folder of --calib-data's images (COCO layout: images[].file_name under it; e.g. train2017/). Without it "
             "a captions file is text only; without both, image prompts use the bundled generated scenes")  # fmt: skip
    add("--image-size", type=int, default=112, help="Image prompts: pixels per side each image is resized to "
        "(a multiple of 28; 112 gives 16 image tokens)")  # fmt: skip
    add("--batch-size", type=int, default=8, help="Batch size for calibration/scoring/evaluation")
    add("--seq-len", type=int, default=64, help="Maximum tokens per caption sample")
    add("--calib-samples", type=int, default=64, help="Captions for calibration")
    add("--score-samples", type=int, default=64, help="Captions for AutoQuant scoring")
    add("--eval-samples", type=int, default=64, help="Held-out captions for evaluation")
    add("--data-seed", type=int, default=0, help="Seed of the caption splits")
    add("--model-seed", type=int, default=0, help="Seed of random-weight models (3B shape)")
    add("--cache-dir", default=str(default_cache_root()),
        help="Artifact cache (default .quantsuite-cache/ or $QUANTSUITE_CACHE)")  # fmt: skip
    add("--drop-exports", action="store_true",
        help="Delete each scheme's export once its tests are done (disk-bound machines; 3B: ~6 GB each)")  # fmt: skip
    add("--vllm-python", default=None,
        help="Python of the vLLM environment (default .venv-vllm/bin/python or $QUANTSUITE_VLLM_PYTHON)")  # fmt: skip
    add("--research-studies", default=",".join(STUDIES),
        help=f"Research studies to run, comma-separated (default all: {','.join(STUDIES)})")  # fmt: skip
    add("--research-score-sizes", default=",".join(map(str, ResearchSettings.score_sizes)),
        help="score_size study: scoring sample sizes, comma-separated (the largest is the reference)")  # fmt: skip
    add("--research-draws", default=",".join(map(str, ResearchSettings.draws)),
        help="score_size study: seeds of the scoring captions drawn from the scoring + training splits")  # fmt: skip
    add("--shard", default=None,
        help="K/N: run the K-th of N shards (each scheme's tests together, on the same shard in every step); merge "
             "the shards' reports/ with python -m quantsuite.report --merge")  # fmt: skip
    add("--run-id", default=None, help="Name of the report directory reports/<run-id> (default: time)")
    add("--no-report", action="store_true", help="Do not write reports/<run-id>/report.md at the end")
    add("--reports-dir", default=str(REPORTS_DIR), help="Where manifests and reports go")


def run_input_arguments(config: pytest.Config) -> list[str]:
    """This run's model and data options (RUN_INPUT_OPTIONS) as `--option=value` arguments, for a pytest run a test
    starts on the same cache: without them it ran the defaults (the tiny model) beside a 3B-shape cache (run gpu-36,
    reports/profile-gpu-h200-nightly)."""
    values = {name: config.getoption(name) for name in RUN_INPUT_OPTIONS}
    return [f"{name}={value}" for name, value in values.items() if value is not None]


def join_split_paths(args: list[str]) -> list[str]:
    """`--model /abs/dir` -> `--model=/abs/dir` for every suite option whose separate value is an existing path."""
    joined, index = [], 0
    while index < len(args):
        argument = args[index]
        if argument in VALUE_OPTIONS and index + 1 < len(args) and Path(args[index + 1]).expanduser().exists():
            joined.append(f"{argument}={args[index + 1]}")
            index += 2
        else:
            joined.append(argument)
            index += 1
    return joined


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: before output capturing starts
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]):
    original = [str(argument) for argument in early_config.invocation_params.args]
    joined = join_split_paths(original)
    if joined == original or os.environ.get(RESTARTED):
        return (yield)
    if sys.argv[1:] != original:  # pytest.main([...]) inside another program: do not replace that process
        raise pytest.UsageError(f"write path options as --option=value (pytest reads a separate existing path as a "
                                f"test path and loses the project's conftest): {' '.join(joined)}")  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[RESTARTED] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *joined])
