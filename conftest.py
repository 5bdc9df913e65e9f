"""Root conftest: loads the suite's pytest layer, quantsuite/plugin/ (options, settings, collection, fixtures,
end-of-run summary and report). Nothing else lives here."""

pytest_plugins = [
    "quantsuite.plugin.options",
    "quantsuite.plugin.session",
    "quantsuite.plugin.collection",
    "quantsuite.plugin.fixtures",
    "quantsuite.plugin.summary",
]
