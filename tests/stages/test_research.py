"""Research stage (quantsuite/stages/research.py): published where the report reads it, one run's results; and the
studies against the artifacts they were computed from: each published figure recomputed from the cached search
states, manifests and drift, and each check shown failing on a planted inconsistency (a ranking shuffled, objectives
swapped between schemes, the grouping study's picks exchanged) before it is trusted."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from quantsuite import analysis
from quantsuite.autoquant import group_scores
from quantsuite.manifest import FUSED_GROUPS
from quantsuite.stages.research import READS_THE_CATALOG, SWEEP_TARGETS, Research


def reading(research: Research, *schemes: str) -> Research:
    """`research` as a run of `schemes` alone (--scheme) sees it: the proxy study reads those schemes' results."""
    return Research(research.context, research.scores, research.schemes, research.drift,
                    replace(research.settings, schemes=schemes))


@pytest.mark.studies
def test_the_studies_but_the_proxy_need_no_schemes_results(workbench, monkeypatch):
    """The nightly's studies step runs beside the shards, on a runner that has none of their results: every enabled
    study but those that read the catalog (`READS_THE_CATALOG`) is built from scoring passes and the BF16 model alone,
    so reading a scheme's manifest or drift there fails instead of building the other runners' work. A study the cache
    holds is not built again (a kept cache costs the step nothing); on a fresh cache (CI's, a runner's) this test is
    the first of the research tests and builds each. Planted: the proxy study fails it."""
    research = workbench.research
    studies = [study for study in research.settings.studies if study not in READS_THE_CATALOG]
    if not studies:
        pytest.skip("--research-studies enables none of the studies that need no scheme's results")

    def forbidden(*args, **kwargs):
        raise AssertionError("a study of the studies step read a catalog scheme's results")

    monkeypatch.setattr(research.schemes, "result", forbidden)
    monkeypatch.setattr(research.drift, "measure", forbidden)
    for study in studies:
        assert getattr(research, study)(), study
    with pytest.raises(AssertionError, match="catalog scheme"):
        reading(research, research._base().name).proxy()  # a scheme whose pick it reads


@pytest.mark.catalog
def test_research_is_published_for_the_report_stamped_with_the_run(workbench):
    result = workbench.research.run()
    path = workbench.context.reports_dir / "research" / workbench.context.model_tag / "research.json"
    published = json.loads(path.read_text())
    studies = set(workbench.research.settings.studies)
    assert published["run_id"] == workbench.context.run_id
    assert set(published) - {"run_id", "settings"} == studies  # each study that ran, and none switched off
    for study in studies:
        assert published[study] == result[study], study
    if "sweep" in studies:
        assert [point["target_effective_bits"] for point in published["sweep"]] == list(SWEEP_TARGETS)


def score_size_problems(study: dict, research) -> list[str]:
    """Each run's rank agreement recomputed from its cached search state against the reference's."""
    states = {(size, draw): research.scores.state(research._plan(score_samples=size, draw=draw))[0]
              for size in study["sizes"] for draw in study["draws"]}  # fmt: skip
    reference = analysis.group_sensitivity(states[study["reference"]["size"], study["reference"]["draw"]])
    problems = []
    for run in study["runs"]:
        agreement = analysis.rank_agreement(analysis.group_sensitivity(states[run["size"], run["draw"]]), reference)
        if agreement["spearman"] != pytest.approx(run["spearman"]):
            problems.append(f"size {run['size']} draw {run['draw']}: Spearman {run['spearman']} published, "
                            f"{agreement['spearman']} from its state")  # fmt: skip
    return problems


@pytest.mark.studies
def test_score_size_study_matches_its_search_states(workbench):
    study = workbench.research.score_size()
    assert study["sizes"] == sorted(workbench.research.settings.score_sizes)
    assert not score_size_problems(study, workbench.research)
    planted = copy.deepcopy(study)  # a ranking shuffled before it is published
    planted["runs"][0]["spearman"], planted["runs"][-2]["spearman"] = study["runs"][-2]["spearman"], study["runs"][0][
        "spearman"]  # fmt: skip
    assert score_size_problems(planted, workbench.research)


def proxy_problems(proxy: dict, workbench) -> list[str]:
    """Each catalog scheme's objective against what its manifest recorded for its own pick, its KL against the
    drift stage's, and the Spearman against the published pairs."""
    problems = []
    for name in proxy["schemes"]:
        if name.startswith("sweep_"):
            continue
        scheme = workbench.context.catalog.scheme(name)
        solver = workbench.schemes.result(scheme).manifest["selection"].get("solver")
        if solver and proxy["objective"][name] != pytest.approx(solver[solver["used"]]["objective"]):
            problems.append(f"{name}: objective {proxy['objective'][name]}, manifest {solver[solver['used']]}")
        if proxy["kl_mean"][name] != pytest.approx(workbench.drift.measure(scheme)["fake_quant"]["kl_mean"]):
            problems.append(f"{name}: KL {proxy['kl_mean'][name]} is not the drift stage's")
    recomputed = analysis.spearman([proxy["objective"][n] for n in proxy["schemes"]],
                                   [proxy["kl_mean"][n] for n in proxy["schemes"]])  # fmt: skip
    if recomputed != pytest.approx(proxy["spearman"]):
        problems.append(f"Spearman {proxy['spearman']} published, {recomputed} from its pairs")
    return problems


@pytest.mark.catalog
def test_proxy_matches_the_manifests_and_the_drift(workbench):
    proxy = workbench.research.proxy()
    searched = [n for n in proxy["schemes"] if not n.startswith("sweep_")]
    selected = set(workbench.research.settings.schemes)  # --scheme: the proxy reads those alone
    assert (set(searched) <= selected) if selected else len(searched) >= 3, proxy["schemes"]
    assert len(proxy["schemes"]) - len(searched) == len(SWEEP_TARGETS), proxy["schemes"]
    assert proxy["interval"][0] <= proxy["interval"][1]
    assert not proxy_problems(proxy, workbench)
    auto = [n for n in searched if workbench.context.catalog.scheme(n).coverage_mode == "auto"]
    if len(auto) < 2:
        pytest.skip("the planted swap needs two AutoQuant schemes with an auto budget: --scheme selected fewer")
    planted = copy.deepcopy(proxy)  # two schemes' objectives swapped
    first, second = auto[:2]
    planted["objective"][first], planted["objective"][second] = proxy["objective"][second], proxy["objective"][first]
    assert proxy_problems(planted, workbench)


@pytest.mark.catalog
@pytest.mark.uses_schemes("top50")
def test_the_proxy_reads_the_drift_of_the_runs_schemes_only(workbench):
    """A run of a few schemes (--scheme) had the proxy study measure every catalog scheme's drift (~30 s each on the
    3B shape, and an export each: gpu-37); it reads the run's schemes now. Planted: the whole catalog again."""
    proxy = reading(workbench.research, "fp8_autoquant_top50").proxy()
    assert [n for n in proxy["schemes"] if not n.startswith("sweep_")] == ["fp8_autoquant_top50"], proxy["schemes"]
    assert set(proxy["left_out"]) <= {"fp8_autoquant_top50"}, proxy["left_out"]


def split_groups(modules: list[str]) -> list[tuple[str, str]]:
    """(block, group) of every q/k/v or gate/up group that `modules` (a pick's quantized layers) quantizes in part."""
    taken: dict[tuple[str, str], int] = {}
    for module in modules:
        for group, pattern in FUSED_GROUPS.items():
            found = pattern.match(module)
            if found:
                taken[found.group(1), group] = taken.get((found.group(1), group), 0) + 1
    return [key for key, count in taken.items() if count != (3 if key[1] == "qkv" else 2)]


@pytest.mark.studies
def test_grouping_study_compares_fused_with_per_linear_picks(workbench):
    study = workbench.research.grouping()
    fused_state = workbench.scores.state(workbench.research._plan())[0]
    finer_state = workbench.scores.state(replace(workbench.research._plan(), grouping="per_linear"))[0]
    assert all(len(group["modules"]) == 1 for group in group_scores(finer_state).values())
    assert any(len(group["modules"]) == 3 for group in group_scores(fused_state).values())  # q/k/v fused
    splits = 0
    for row in study["rows"]:
        assert not split_groups(row["fused"]["quantized_modules"]), row["target_effective_bits"]
        splits += len(split_groups(row["per_linear"]["quantized_modules"]))
        cost = row["fused_cost"]
        assert cost["difference"] == pytest.approx(row["fused"]["kl_mean"] - row["per_linear"]["kl_mean"], rel=1e-6)
        assert cost["differs"] == (not cost["interval"][0] <= 0 <= cost["interval"][1])
        assert row["overlap"] == pytest.approx(analysis.jaccard(row["fused"]["quantized_modules"],
                                                                row["per_linear"]["quantized_modules"]))  # fmt: skip
    if not splits:
        pytest.skip("no budget's per-linear pick splits a fused group here: the planted swap would not show")
    planted = [row["per_linear"]["quantized_modules"] for row in study["rows"]]  # the picks exchanged
    assert any(split_groups(modules) for modules in planted)
