"""The pytest layer of quantsuite, the one part of the package that imports pytest (the library never does).

- `options`: the command-line options (also a `pytest11` entry point, so pytest knows them before it picks a
  rootdir);
- `session`: the run's settings, checked once at start-up and built once per process (`settings(config)`);
- `collection`: scheme and vLLM-check parametrization, --scheme selection, order, xdist work units;
- `fixtures`: the session fixtures (Workbench, fake-quant model, export, vLLM service);
- `summary`: time per stage and per scheme, artifacts, and the run's report at the end.

The root conftest loads them (`pytest_plugins`); the steps of a run are in scripts/test.sh and scripts/nightly.sh.
"""
