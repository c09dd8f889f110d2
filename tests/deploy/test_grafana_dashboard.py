"""The Grafana dashboard (deploy/grafana) against the metrics the aggregator really exports.

The exported names come from the live registry of the service's own ``ServiceMetrics`` (an
``Aggregator`` built from settings, never started), never from a list written here: a panel
naming a metric the service does not export fails, and so does an exported family no panel
shows. Every PromQL expression is parsed with promql-parser (the Python binding of the Rust
``promql-parser`` crate) after substituting Grafana's variables as Grafana does, so each one
must also be valid PromQL; the metric names are the parsed selectors' names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from aggregator.service import Aggregator
from aggregator.settings import AggregatorSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "fedfstq-aggregator.json"
OVERLAY = GRAFANA / "compose.grafana.yml"
#: The data source every panel, query and annotation must go through.
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge"}
#: Grafana's built-in variables, with values of the kind Grafana substitutes.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "6h"}
#: Sample-name suffixes Prometheus stores for a family of each type (prometheus_client's names).
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}  # fmt: skip
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

Dashboard = dict[str, Any]


# -- what the service exports --------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every sample name Prometheus can store from the service -> its metric family."""
    settings = AggregatorSettings.model_validate(
        {"state_dir": tmp_path_factory.mktemp("agg"), "model": "tiny"}
    )
    registry = Aggregator(settings).prometheus.registry
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
        for sample in family.samples:  # what it exposes now (``_created`` too)
            names[sample.name] = family.name
    assert len(set(names.values())) >= 10, "the registry looks empty"
    return names


# -- reading the dashboard -----------------------------------------------------------------


def _load(text: str | None = None) -> Dashboard:
    data = json.loads(DASHBOARD.read_text() if text is None else text)
    assert isinstance(data, dict)
    return data


def _panels(dashboard: Dashboard) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _expressions(dashboard: Dashboard) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, PromQL, the query object) of every panel query and annotation."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"], target
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"], annotation


def _variables(dashboard: Dashboard) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _interpolate(expr: str, dashboard: Dashboard) -> str:
    """Substitute variables as Grafana does before sending a query: durations for interval
    variables; query variables stay literal (they may only appear inside label-matcher quotes,
    where ``$name`` is a valid string, so one used elsewhere fails to parse)."""
    variables = _variables(dashboard)

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in variables, f"undefined variable ${name} in {expr}"
        variable = variables[name]
        if variable["type"] == "interval":
            return str(variable["current"]["value"])
        assert variable["type"] == "query", f"${name} ({variable['type']}) in {expr}"
        return match.group(0)

    return _VARIABLE.sub(value, expr)


def _parse(expr: str, dashboard: Dashboard) -> promql_parser.Expr:
    try:
        return promql_parser.parse(_interpolate(expr, dashboard))
    except ValueError as exc:
        raise AssertionError(f"not valid PromQL: {expr}: {exc}") from None


def _selectors(tree: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(tree, pre_visit=visit)
    return found


def _metric_name(selector: promql_parser.VectorSelector) -> str:
    if selector.name is not None:
        return selector.name
    by_name = [m.value for m in selector.matchers.matchers
               if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal]  # fmt: skip
    assert by_name, f"a selector without a metric name: {selector}"
    return by_name[0]


def _grouping(tree: promql_parser.Expr) -> set[str]:
    """Labels of every ``by (...)`` clause in the expression."""
    labels: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        modifier = node.modifier if isinstance(node, promql_parser.AggregateExpr) else None
        if modifier is not None and modifier.type == promql_parser.AggModifierType.By:
            labels.update(modifier.labels)

    promql_parser.walk(tree, pre_visit=visit)
    return labels


def _used_names(dashboard: Dashboard) -> dict[str, list[str]]:
    """Metric name -> where it is used, over every expression and the query variables."""
    used: dict[str, list[str]] = {}
    for where, expr, _ in _expressions(dashboard):
        for selector in _selectors(_parse(expr, dashboard)):
            used.setdefault(_metric_name(selector), []).append(where)
    for name, variable in _variables(dashboard).items():
        if variable["type"] == "query":  # label_values(metric, label)
            call = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert call is not None, variable["definition"]
            used.setdefault(call[1], []).append(f"variable ${name}")
    return used


def _unknown(dashboard: Dashboard, exported: dict[str, str]) -> dict[str, list[str]]:
    return {n: w for n, w in _used_names(dashboard).items() if n not in exported}


def _without_panel(dashboard: Dashboard, exported: dict[str, str]) -> set[str]:
    """Exported families that no panel query shows."""
    shown = set()
    for where, expr, _ in _expressions(dashboard):
        if where.startswith("panel "):
            shown |= {exported.get(_metric_name(s)) for s in _selectors(_parse(expr, dashboard))}
    return set(exported.values()) - shown


# -- the tests -------------------------------------------------------------------------------


def test_every_query_is_promql_over_metrics_the_service_exports(
    exported: dict[str, str],
) -> None:
    dashboard = _load()
    assert sum(1 for _ in _expressions(dashboard)) >= 20
    assert _unknown(dashboard, exported) == {}


def test_every_exported_metric_family_is_on_a_panel(exported: dict[str, str]) -> None:
    assert _without_panel(_load(), exported) == set()


def test_a_renamed_or_missing_metric_fails_the_checks(exported: dict[str, str]) -> None:
    """The checks above are not vacuous: renaming one metric in the JSON trips both."""
    text = DASHBOARD.read_text()
    old, new = "fedfstq_aggregator_clients_live", "fedfstq_aggregator_clients_alive"
    assert old in text
    renamed = _load(text.replace(old, new))
    assert set(_unknown(renamed, exported)) == {new}
    assert _without_panel(renamed, exported) == {old}
    # A histogram named with a suffix its type does not expose is unknown too.
    bad = _load(text.replace("upload_completion_seconds_bucket", "upload_completion_seconds_total"))
    assert set(_unknown(bad, exported)) == {"fedfstq_aggregator_upload_completion_seconds_total"}


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    dashboard = _load()
    variables = _variables(dashboard)
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel, panel["title"]
            continue
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
    for where, _, query in _expressions(dashboard):
        assert query["datasource"] == DS, where
    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"] == DS, name
    builtin = [a for a in dashboard["annotations"]["list"] if "expr" not in a]
    assert all(a["datasource"]["type"] == "grafana" for a in builtin)


def test_variables_are_defined_used_and_filter_every_selector() -> None:
    dashboard = _load()
    variables = _variables(dashboard)
    referenced: set[str] = set()
    for where, expr, query in _expressions(dashboard):
        referenced |= {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}
        tree = _parse(expr, dashboard)  # an undefined variable fails here
        for selector in _selectors(tree):
            matchers = {(m.name, str(m.op), m.value) for m in selector.matchers.matchers}
            assert ("instance", str(promql_parser.MatchOp.Re), "$instance") in matchers, where
        # A legend may only name labels the query keeps (a ``by`` clause).
        legend = set(_LEGEND_LABEL.findall(query.get("legendFormat", "")))
        assert legend <= _grouping(tree), (where, legend)
    assert set(variables) - {"DS_PROMETHEUS"} <= referenced
    instance = variables["instance"]
    assert instance["includeAll"] and instance["allValue"] == ".*" and instance["multi"]
    window = variables["window"]
    assert window["current"]["value"] in window["query"].split(",")


def test_layout_is_a_valid_grafana_dashboard() -> None:
    dashboard = _load()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "fedfstq-aggregator" and dashboard["title"]
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert {p["type"] for p in panels} <= PANEL_TYPES
    assert {"timeseries", "stat", "bargauge"} <= {p["type"] for p in panels}
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


# -- provisioning and the compose overlay --------------------------------------------------


def _yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def test_the_compose_overlay_provisions_the_dashboard_against_the_aggregator() -> None:
    base, overlay = _yaml(DEPLOY / "compose.yml"), _yaml(OVERLAY)
    assert set(overlay["services"]) == {"prometheus", "grafana"}
    assert not set(overlay["services"]) & set(base["services"])
    assert not set(overlay["volumes"]) & set(base["volumes"])
    mounts: dict[str, dict[str, str]] = {}
    for name, service in overlay["services"].items():
        mounts[name] = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            mounts[name][target] = source
            if source.startswith("."):  # relative to deploy/, the first compose file's folder
                assert (DEPLOY / source).exists(), source
            else:
                assert source in overlay["volumes"], source
    assert overlay["secrets"]["grafana_admin_password"]["file"].startswith("./secrets/")
    grafana = overlay["services"]["grafana"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # never on a public interface
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana_admin_password"
    )
    # Prometheus scrapes the aggregator's service name on the port compose.yml configures.
    prom_config = mounts["prometheus"]["/etc/prometheus/prometheus.yml"]
    scrape = _yaml(DEPLOY / prom_config)["scrape_configs"]
    targets = [t for job in scrape for c in job["static_configs"] for t in c["targets"]]
    port = base["services"]["aggregator"]["environment"]["FEDFSTQ_AGG_METRICS_PORT"]
    assert targets == [f"aggregator:{port}"]
    # Grafana's data source is that Prometheus, of the type the dashboard's variable selects.
    sources = DEPLOY / mounts["grafana"]["/etc/grafana/provisioning/datasources"]
    (source,) = _yaml(sources / "prometheus.yml")["datasources"]
    assert source["type"] == DS["type"] and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    # The dashboard provider reads the folder the dashboard JSON is mounted into.
    providers = DEPLOY / mounts["grafana"]["/etc/grafana/provisioning/dashboards"]
    (provider,) = _yaml(providers / "fedfstq.yml")["providers"]
    mounted = {t: s for t, s in mounts["grafana"].items() if s.endswith(".json")}
    assert [(DEPLOY / s).resolve() for s in mounted.values()] == [DASHBOARD]
    assert [str(Path(t).parent) for t in mounted] == [provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in mounted
