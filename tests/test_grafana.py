"""docs/grafana/jaxserve.json against what the server exports: every panel query names metrics
that a live server's /metrics really has, and (where Debian's `prometheus` is installed) every
query evaluates to data in a real Prometheus scraping that server. Also the README's table.

No Grafana can be installed here (neither Debian nor PyPI packages it), so the dashboard
itself is checked as JSON: the shape Grafana's importer needs, with no panel left dangling.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.config import ServerConfig
from jaxserve.server import Bridge
from tests.http_server import free_port, run_server

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "jaxserve.json"
METRIC = re.compile(r"\bjaxserve_[a-z0-9_]+\b")
GRAFANA_VARS = {"$__rate_interval": "5s", "$instance": ".*"}  # what Grafana substitutes


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def grafana_free(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """A live server; its metric names do not depend on an engine running behind it."""
    with run_server(Bridge(), ServerConfig()) as url:
        yield url


@pytest.fixture(scope="module")
def exported(url) -> dict[str, set[str]]:
    """Family name -> its sample names (`_bucket`, `_total`, ...) on /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(text)}


def test_dashboard_is_importable_json(dashboard):
    assert dashboard["uid"] and dashboard["title"] == "jaxserve" and dashboard["schemaVersion"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dashboard):
        assert p["title"] and p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in panels(dashboard))
    for topic in ("tokens", "first token", "inter-token", "end-to-end", "kv cache", "waiting"):
        assert topic in titles, topic
    for topic in ("prefix cache hit rate", "compilations", "retractions"):
        assert topic in titles, topic


def test_every_panel_query_names_an_exported_metric(dashboard, exported):
    samples = set().union(*exported.values())
    named = {m for expr in queries(dashboard) for m in METRIC.findall(expr)}
    assert named, "no queries?"
    missing = sorted(named - samples)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    assert any("histogram_quantile" in q and "_bucket" in q for q in queries(dashboard))
    # and the other way: nothing exported goes unseen (the instance variable's query counts)
    named |= set(METRIC.findall(json.dumps(dashboard["templating"])))
    unseen = sorted(family for family, names in exported.items() if not names & named)
    assert not unseen, f"exported but on no panel: {unseen}"


def test_readme_metrics_table_lists_every_exported_metric(exported):
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Metrics") :]
    table = table[: table.index("\n#")]  # up to the next heading
    listed = set(re.findall(r"`(jaxserve_[a-z0-9_]+)", table))
    # as PromQL names them: counters with _total, histograms by their family name
    names = {n + "_total" if n + "_total" in s else n for n, s in exported.items()}
    assert listed == names, (sorted(names - listed), sorted(listed - names))


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary (Debian)")
def test_every_query_evaluates_in_a_real_prometheus(dashboard, url, tmp_path):
    port = free_port()
    target = url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: jaxserve, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    cmd = [
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    api = f"http://127.0.0.1:{port}/api/v1"
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as prom:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a few scrapes, so rate() has two samples
                try:
                    r = httpx.get(f"{api}/query", params={"query": "count_over_time(up[1m])"})
                    result = r.json()["data"]["result"] if r.status_code == 200 else []
                    if result and float(result[0]["value"][1]) >= 4:
                        break
                except httpx.TransportError:
                    pass  # not listening yet (it answers 503 while starting)
                time.sleep(0.5)
            else:
                pytest.fail("prometheus did not scrape the server")
            empty = []
            for expr in queries(dashboard):
                r = httpx.get(f"{api}/query", params={"query": grafana_free(expr)}).json()
                assert r["status"] == "success", (expr, r)
                if not r["data"]["result"]:
                    empty.append(expr)
            assert not empty, f"queries with no data: {empty}"
            instance_var = dashboard["templating"]["list"][1]["definition"]
            metric = re.search(r"label_values\((\w+), instance\)", instance_var).group(1)
            r = httpx.get(f"{api}/label/instance/values", params={"match[]": metric}).json()
            assert r["data"] == [target]
        finally:
            prom.terminate()
