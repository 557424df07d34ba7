"""The shipped observability files, read for the tests: the PromQL of the dashboard and the rules.

Grafana expands its own variables before a query reaches Prometheus; `expand` does the same for
the ones the dashboard uses, so an expression can be checked by promtool or sent to a real
Prometheus as Grafana would send it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
RULES = ROOT / "prometheus" / "rules" / "rabbitq.yml"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "rabbitq.yml"
DASHBOARD = ROOT / "grafana" / "dashboards" / "rabbitq.json"

# What Grafana puts in place of its variables; a range and intervals that suit a run of a few
# minutes scraped every second. `$1` in label_replace is not a variable and stays.
GRAFANA_VARIABLES = {
    "workload": ".+",  # the dashboard's "All" (its allValue)
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression and where it comes from (a panel's target or a rule)."""

    where: str
    expr: str


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expand(expr: str, variables: dict[str, str] = GRAFANA_VARIABLES) -> str:
    """`expr` with Grafana's variables replaced; unknown `$names` (such as `$1`) are kept."""

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return variables.get(name, match[0])

    return _VARIABLE.sub(replace, expr)


def dashboard_queries() -> list[Query]:
    """Every target's expression in the dashboard, Grafana variables expanded."""
    out = []
    for panel in panels(load_dashboard()):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} target {target['refId']}"
            out.append(Query(where, expand(target["expr"])))
    return out


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(f"alert {rule['alert']}", rule["expr"]) for rule in rules()]
