"""The Helm chart: it renders, lints, passes Kubernetes' own schemas, and configures the daemon this package ships.

Rendering uses Helm itself (as a library, offline); every core manifest goes through `kubernetes-validate --strict`
for the oldest Kubernetes the chart claims to support well (1.30); the daemon config and the command line are
checked by the daemon's own loader and argument parser, and the rendered config starts a real daemon.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import helm_python
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor import wire
from monitor.cli import build_parser
from monitor.client.reporter import Reporter
from monitor.daemon.alerts import RULE_KEYS
from monitor.daemon.app import DaemonConfig
from monitor.daemon.detectors import ALERT_SEVERITIES
from tests.helpers import ROOT, http_json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, as the daemon does
    import tomli as tomllib  # type: ignore[no-redef]

CHART = ROOT / "helm" / "trainguard"
ALL_VALUES = CHART / "ci" / "all-values.yaml"
KUBE_VERSION = "1.30.0"
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
RELEASE, NAMESPACE = "trainguard", "ml"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
# [daemon] keys the chart sets itself (in the ConfigMap, or as serve flags).
CHART_MANAGED = {"host", "grpc_port", "http_port", "db", "tls_cert_file", "tls_key_file", "tls_client_ca_file",
                 "auth_tokens_file", "insecure"}

# A small dashboard and rule file in the formats the chart's dashboards/ and rules/ hold, so that the templates
# that turn them into objects are tested whatever those folders hold at the moment.
FIXTURE_DASHBOARD = {"title": "Fixture runs", "uid": "tg-fixture", "schemaVersion": 39, "panels": [
    {"type": "timeseries", "title": "Loss", "targets": [{"expr": 'trainguard_train_loss{run=~"$run"}'}]}]}
FIXTURE_RULES = {"groups": [{"name": "trainguard-fixture", "rules": [
    {"alert": "TrainguardFixtureDown", "expr": 'up{job="trainguard"} == 0', "for": "5m",
     "labels": {"severity": "critical"},
     "annotations": {"summary": "trainguard on {{ $labels.instance }} is down"}}]}]}


def render(values: dict[str, Any] | None = None, chart: Path = CHART, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart renders, NOTES.txt aside."""
    out = helm_python.Chart.load(chart).render(values, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    out = helm_python.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and not d["metadata"]["name"].count("-dashboard-")]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def daemon_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(one(docs, "ConfigMap")["data"]["trainguard.toml"])


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Values layered the way Helm coalesces them (maps merge, everything else is replaced)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@pytest.fixture(scope="module")
def all_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_VALUES.read_text())


@pytest.fixture(scope="module")
def fixture_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart whose dashboards/ and rules/ hold exactly the fixtures above."""
    chart = tmp_path_factory.mktemp("chart") / "trainguard"
    shutil.copytree(CHART, chart)
    for sub in ("dashboards", "rules"):
        shutil.rmtree(chart / sub, ignore_errors=True)
        (chart / sub).mkdir()
    (chart / "dashboards" / "Fixture_Runs.json").write_text(json.dumps(FIXTURE_DASHBOARD, indent=2))
    (chart / "rules" / "fixture.yml").write_text(yaml.safe_dump(FIXTURE_RULES, sort_keys=False))
    # Not picked up: the templates glob *.json and *.yml only.
    (chart / "rules" / "README.md").write_text("rule files\n")
    return chart


# ---------------------------------------------------------------------------------------------------------------
# rendering, lint, Kubernetes schemas

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-persistence": {"persistence": {"enabled": False}},
    "existing-claim": {"persistence": {"existingClaim": "trainguard-data"}},
    "no-storage-class": {"persistence": {"storageClass": "-"}},
    "tls-same-secret-ca": {"tls": {"enabled": True, "secretName": "tg-tls", "clientCA": {"enabled": True}}},
    "no-service-account": {"serviceAccount": {"create": False, "name": "shared"}},
    "no-probes": {p: {"enabled": False} for p in ("startupProbe", "livenessProbe", "readinessProbe")},
    "nodeport": {"service": {"type": "NodePort"}, "image": {"tag": "latest"}},
}


def variant(name: str, all_values: dict[str, Any]) -> dict[str, Any]:
    return all_values if name == "all" else VARIANTS[name]


@pytest.mark.parametrize("values_name", ["default", "all"])
def test_lint_reports_neither_errors_nor_warnings(values_name: str, all_values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, variant(values_name, all_values), namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is information (an icon is recommended); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_sees_a_broken_template(tmp_path: Path) -> None:
    chart = tmp_path / "trainguard"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "broken.yaml").write_text("{{ .Values.service.grpcPort | nosuchfunction }}\n")
    report = helm_python.lint(chart)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


def test_default_render_is_the_daemon_alone() -> None:
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Service", "ServiceAccount", "StatefulSet"]
    assert {d["metadata"]["namespace"] for d in docs} == {NAMESPACE}
    assert all(d["metadata"]["name"] == RELEASE for d in docs)


def test_every_option_renders_every_object(all_values: dict[str, Any], fixture_chart: Path) -> None:
    docs = render(all_values, chart=fixture_chart)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "PrometheusRule", "Service", "ServiceAccount", "ServiceMonitor",
                     "StatefulSet"]


def kubernetes_validate(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    files = []
    for i, doc in enumerate(docs):
        f = tmp_path / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        f.write_text(yaml.safe_dump(doc))
        files.append(str(f))
    return subprocess.run([str(KUBERNETES_VALIDATE), "-k", KUBE_VERSION, "--strict", *files],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values_name", ["all", *VARIANTS])
def test_core_manifests_pass_kubernetes_validate_strict(values_name: str, all_values: dict[str, Any],
                                                       fixture_chart: Path, tmp_path: Path) -> None:
    docs = [d for d in render(variant(values_name, all_values), chart=fixture_chart) if d["kind"] not in CUSTOM_KINDS]
    res = kubernetes_validate(docs, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # One "passed" line per object: none was skipped for want of a schema.
    assert res.stdout.count(" passed for resource ") == len(docs), res.stdout


def test_kubernetes_validate_rejects_what_the_api_server_would(tmp_path: Path) -> None:
    # The same check as above on a StatefulSet with one misspelt field: it must fail, or the test above proves
    # nothing.
    sts = one(render(), "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    res = kubernetes_validate([sts], tmp_path)
    assert res.returncode != 0
    assert "readOnlyRootFileSystem" in res.stdout


# ---------------------------------------------------------------------------------------------------------------
# values.schema.json

@pytest.mark.parametrize(("values", "message"), [
    ({"service": {"grpcPort": -1}}, "/service/grpcPort"),
    ({"service": {"httpPort": 70000}}, "/service/httpPort"),
    ({"service": {"grpcPort": "9751"}}, "/service/grpcPort"),
    ({"service": {"type": "Ingress"}}, "/service/type"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"logLevel": "TRACE"}, "/logLevel"),
    ({"replicaCount": 2}, "'replicaCount' not allowed"),
    ({"persistance": {"enabled": False}}, "'persistance' not allowed"),
    ({"persistence": {"enabled": "yes"}}, "/persistence/enabled"),
    ({"persistence": {"size": "ten gigabytes"}}, "/persistence/size"),
    ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "/persistence/accessModes/0"),
    ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
    ({"serviceMonitor": {"labels": {"release": 1}}}, "/serviceMonitor/labels/release"),
    ({"dashboards": {"lable": "grafana_dashboard"}}, "'lable' not allowed"),
    ({"tls": {"enabled": "true"}}, "/tls/enabled"),
    ({"livenessProbe": {"periodSeconds": 0}}, "/livenessProbe/periodSeconds"),
    ({"fullnameOverride": "Trainguard_Daemon"}, "/fullnameOverride"),
    # The chart sets the listen address, ports and store path from the pod; a config value would be ignored.
    ({"config": {"daemon": {"host": "127.0.0.1"}}}, "'host' not allowed"),
    ({"config": {"daemon": {"tls_cert_file": "/x.crt"}}}, "'tls_cert_file' not allowed"),
    ({"config": {"daemon": {"windw": 512}}}, "'windw' not allowed"),
    ({"config": {"daemon": {"notify_backoff": 0}}}, "/config/daemon/notify_backoff"),
    ({"config": {"daemon": {"window": 0}}}, "/config/daemon/window"),
    ({"config": {"daemon": {"alertmanager_urls": "http://am:9093"}}}, "/config/daemon/alertmanager_urls"),
    ({"config": {"daemon": {"alertmanager_urls": ["am:9093"]}}}, "/config/daemon/alertmanager_urls/0"),
    ({"config": {"detectors": {"LossSpik": {}}}}, "'LossSpik' not allowed"),
    ({"config": {"detectors": {"LossSpike": {"severity": "high"}}}}, "/config/detectors/LossSpike/severity"),
    ({"config": {"alerts": {"LossSpike": {"for_step": 3}}}}, "'for_step' not allowed"),
    ({"config": {"alerts": {"for_steps": -1}}}, "/config/alerts/for_steps"),
])
def test_schema_rejects_bad_values_naming_the_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as e:
        render(values)
    assert message in str(e.value)


@pytest.mark.parametrize(("values", "message"), [
    ({"tls": {"enabled": True}}, "tls.secretName"),
    ({"tls": {"clientCA": {"enabled": True}}}, "tls.clientCA.enabled"),
    ({"auth": {"enabled": True}}, "auth.existingSecret"),
])
def test_settings_that_need_each_other_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError) as e:
        render(values)
    assert message in str(e.value)


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_schema_knows_every_daemon_setting_the_chart_leaves_to_the_user() -> None:
    # A setting added to the daemon must be added here too, or the schema would refuse it.
    s = schema()
    settable = {f.name for f in dataclasses.fields(DaemonConfig)} - CHART_MANAGED - {"alerts", "detectors"}
    assert set(s["properties"]["config"]["properties"]["daemon"]["properties"]) == settable


def test_schema_knows_every_alert_and_lifecycle_setting() -> None:
    s = schema()
    cfg = s["properties"]["config"]["properties"]
    assert set(cfg["detectors"]["properties"]) == set(ALERT_SEVERITIES)
    assert set(cfg["alerts"]["properties"]) == set(ALERT_SEVERITIES) | set(RULE_KEYS)
    assert set(s["definitions"]["alertRule"]["properties"]) == set(RULE_KEYS)


def test_defaults_and_all_values_satisfy_the_schema(all_values: dict[str, Any]) -> None:
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(chart.merge_values(None))
    chart.validate_schema(chart.merge_values(all_values))


# ---------------------------------------------------------------------------------------------------------------
# the daemon config

def expected_config(values: dict[str, Any], fullname: str = RELEASE) -> dict[str, Any]:
    """What the daemon should read: the values' config, plus what the chart adds."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    v = merged(defaults, values)
    cfg = copy.deepcopy(v["config"])
    daemon = cfg["daemon"]
    daemon.setdefault("external_url", f"http://{fullname}.{NAMESPACE}.svc:{v['service']['httpPort']}")
    if v["tls"]["enabled"]:
        daemon["tls_cert_file"] = "/etc/trainguard/tls/tls.crt"
        daemon["tls_key_file"] = "/etc/trainguard/tls/tls.key"
        if v["tls"]["clientCA"]["enabled"]:
            daemon["tls_client_ca_file"] = "/etc/trainguard/tls/client-ca.crt"
    if v["auth"]["enabled"]:
        daemon["auth_tokens_file"] = "/etc/trainguard/auth/tokens"
    return cfg


def load_in_daemon(cfg: dict[str, Any]) -> DaemonConfig:
    """The daemon's own loader on the rendered config: every key the chart writes is one the daemon knows."""
    return DaemonConfig.from_mapping(copy.deepcopy(cfg), "rendered config").validate()


def test_default_config_is_what_the_daemon_reads() -> None:
    cfg = daemon_toml(render())
    assert cfg == expected_config({})
    d = load_in_daemon(cfg)
    assert d.external_url == f"http://{RELEASE}.{NAMESPACE}.svc:9750"
    assert d.alertmanager_urls == [] and d.detectors == {} and d.alerts == {}


def test_all_values_config_is_what_the_daemon_reads(all_values: dict[str, Any]) -> None:
    cfg = daemon_toml(render(all_values))
    assert cfg == expected_config(all_values, fullname=all_values["fullnameOverride"])
    d = load_in_daemon(cfg)
    assert d.alertmanager_urls == all_values["config"]["daemon"]["alertmanager_urls"]
    # Helm holds every number as a float64: large whole numbers must still arrive as integers.
    assert d.notify_queue_size == 1_000_000 and isinstance(d.notify_queue_size, int)
    assert d.expire_silent_after == 3_600_000
    assert d.notify_backoff == 0.25
    assert d.detectors["LossPlateau"] == {"enabled": False}
    assert d.alert_rules().rule("LossSpike").keep_firing_for_steps == 50
    assert d.alert_rules().rule("TrainingStalled").for_seconds == 120


def test_alertmanager_urls_from_set_flags() -> None:
    # `--set config.daemon.alertmanager_urls={http://a:9093,http://b:9093}` gives a list of strings.
    urls = ["http://alertmanager-operated.monitoring.svc:9093", "http://am-1.monitoring.svc:9093"]
    docs = render({"config": {"daemon": {"alertmanager_urls": urls}}})
    assert load_in_daemon(daemon_toml(docs)).alertmanager_urls == urls
    assert all(u in notes({"config": {"daemon": {"alertmanager_urls": urls}}}) for u in urls)


def test_toml_keeps_strings_numbers_and_lists_exact() -> None:
    # Detector tables take any key (the daemon checks them), which lets this reach every branch of the writer.
    tricky = {"quote": 'say "hi"', "backslash": "C:\\path\\n", "newline": "a\nb\tc", "unicode": "Δ loss ≥ 2σ",
              "braces": "{alert} {{ $labels.run }}", "empty": "", "small": 1e-05, "big_float": 1.5e20,
              "negative": -3, "whole_float": 4.0, "huge_int": 10**12, "yes": True, "no": False,
              "nested": [[1, 2], ["a"]], "mixed": [0.5, 2], "none": []}
    values = {"config": {"daemon": {"runbook_url": tricky["quote"]}, "detectors": {"LossSpike": tricky}}}
    cfg = daemon_toml(render(values))
    assert cfg["detectors"]["LossSpike"] == tricky
    assert isinstance(cfg["detectors"]["LossSpike"]["huge_int"], int)
    assert cfg["daemon"]["runbook_url"] == tricky["quote"]


def test_toml_refuses_what_it_cannot_write() -> None:
    with pytest.raises(helm_python.HelmError) as e:
        render({"config": {"detectors": {"LossSpike": {"bands": [{"lo": 1}]}}}})
    assert "config.detectors.LossSpike.bands" in str(e.value)


def test_null_drops_a_setting() -> None:
    cfg = daemon_toml(render({"config": {"daemon": {"runbook_url": None}}}))
    assert "runbook_url" not in cfg["daemon"]


def test_config_change_rolls_the_pod_and_nothing_else_does() -> None:
    def checksum(values: dict[str, Any]) -> str:
        return one(render(values), "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})
    assert checksum({}) == base
    assert checksum({"config": {"detectors": {"LossSpike": {"persist_z": 5}}}}) != base
    assert checksum({"config": {"daemon": {"alertmanager_urls": ["http://am:9093"]}}}) != base
    assert checksum({"podAnnotations": {"a": "b"}, "resources": {}}) == base


def test_daemon_starts_from_the_rendered_pod_spec(tmp_path: Path) -> None:
    """The container's command line and the ConfigMap, run as the image runs them: no torch importable."""
    docs = render()
    c = container(docs)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    config_file = tmp_path / "config" / "trainguard.toml"
    config_file.parent.mkdir()
    config_file.write_text(one(docs, "ConfigMap")["data"]["trainguard.toml"])
    args = [a.replace(mount["mountPath"], str(config_file.parent)) for a in c["args"]]
    ready = tmp_path / "ready.json"
    # Later flags win: the same command on loopback, free ports and a temporary store.
    args += ["--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--db", str(tmp_path / "data" / "tg.db"),
             "--ready-file", str(ready)]
    blocked = ("torch", "transformers", "accelerate", "lightning", "deepspeed", "numpy")
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            "from monitor.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, **{e["name"]: e["value"] for e in c["env"]}}
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        # What the kubelet's gRPC probe asks: the server as a whole (service "") and the telemetry service.
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", wire.SERVICE):
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.SERVING
        assert http_json(f"http://127.0.0.1:{ports['http_port']}/healthz")["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# ---------------------------------------------------------------------------------------------------------------
# the pod

@pytest.mark.parametrize("values_name", ["default", "all"])
def test_command_line_is_one_the_cli_accepts(values_name: str, all_values: dict[str, Any]) -> None:
    docs = render(variant(values_name, all_values))
    c = container(docs)
    assert c["command"] == ["trainguard"]
    args = build_parser().parse_args(c["args"])  # exits (SystemExit) on a flag serve does not have
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    # Every interface: without tokens or mutual TLS the daemon refuses to start unless told --insecure.
    assert args.insecure is (True if values_name == "default" else None)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert (args.grpc_port, args.http_port) == (ports["grpc"], ports["http"]) == (9751, 9750)
    # --config names the ConfigMap's key where the config volume is mounted.
    config_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert Path(args.config) == Path(config_mount["mountPath"]) / "trainguard.toml"
    assert "trainguard.toml" in one(docs, "ConfigMap")["data"]
    # The store sits on the data volume, never on the read-only root filesystem.
    data_mount = next(m for m in c["volumeMounts"] if m["name"] == "data")
    assert Path(args.db).parent == Path(data_mount["mountPath"])
    assert not data_mount.get("readOnly", False)


def test_probes_ask_grpc_health_on_the_grpc_port() -> None:
    c = container(render())
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[name]["grpc"] == {"port": grpc_port, "service": ""}
    # A restore of a big store may take minutes before the ports open; liveness must not kill it meanwhile.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300


def test_probes_fall_back_to_tcp_when_the_port_speaks_tls(all_values: dict[str, Any]) -> None:
    c = container(render(all_values))
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in c[name]
        assert c[name]["tcpSocket"] == {"port": "grpc"}


def test_probes_can_be_turned_off() -> None:
    c = container(render(VARIANTS["no-probes"]))
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(c)


@pytest.mark.parametrize("values_name", ["default", "all"])
def test_pod_runs_locked_down(values_name: str, all_values: dict[str, Any]) -> None:
    docs = render(variant(values_name, all_values))
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532
    assert psc["fsGroup"] == 65532  # the volume is writable by the daemon's user
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is False
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    # With a read-only root, every place Python and SQLite write to is a volume.
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/data", "/tmp"} <= mounts
    assert {e["name"]: e["value"] for e in pod["containers"][0]["env"]}["PYTHONDONTWRITEBYTECODE"] == "1"
    res = pod["containers"][0]["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


def test_one_replica_and_a_volume_claim_per_pod() -> None:
    sts = one(render(), "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == one(render(), "Service")["metadata"]["name"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}


def test_persistence_options() -> None:
    def sts(values: dict[str, Any]) -> dict[str, Any]:
        return one(render(values), "StatefulSet")["spec"]

    def data_volume(spec: dict[str, Any]) -> dict[str, Any]:
        return next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == "data")

    off = sts(VARIANTS["no-persistence"])
    assert "volumeClaimTemplates" not in off and data_volume(off) == {"name": "data", "emptyDir": {}}
    claim = sts(VARIANTS["existing-claim"])
    assert "volumeClaimTemplates" not in claim
    assert data_volume(claim)["persistentVolumeClaim"] == {"claimName": "trainguard-data"}
    assert sts(VARIANTS["no-storage-class"])["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""
    assert sts({"persistence": {"storageClass": "fast", "size": "1Ti"}})["volumeClaimTemplates"][0]["spec"] == {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "fast", "resources": {"requests": {"storage": "1Ti"}}}
    assert "persistence.enabled is false" not in notes({}) and "persistence.enabled is false" in notes(
        VARIANTS["no-persistence"])


def test_service_names_its_ports_after_the_containers(all_values: dict[str, Any]) -> None:
    for values, grpc_port, http_port in (({}, 9751, 9750), (all_values, 19751, 19750)):
        docs = render(values)
        svc = one(docs, "Service")
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["grpc"]["port"] == grpc_port and ports["grpc"]["appProtocol"] == "grpc"
        assert ports["http"]["port"] == http_port and ports["http"]["appProtocol"] == "http"
        names = {p["name"] for p in container(docs)["ports"]}
        assert {p["targetPort"] for p in ports.values()} == names == {"grpc", "http"}
        pod_labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert one(docs, "StatefulSet")["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_tls_and_token_files_are_mounted_where_the_config_points(all_values: dict[str, Any]) -> None:
    docs = render(all_values)
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def source_of(path: str) -> tuple[str, str]:
        """(secret name, key) that the file at `path` comes from."""
        mount = mounts[str(Path(path).parent)]
        assert mount["readOnly"] is True
        vol = volumes[mount["name"]]
        secrets = [s["secret"] for s in vol["projected"]["sources"]] if "projected" in vol else [
            {"name": vol["secret"]["secretName"], "items": vol["secret"]["items"]}]
        found = [(s["name"], i["key"]) for s in secrets for i in s["items"] if i["path"] == Path(path).name]
        assert len(found) == 1, path
        return found[0]

    daemon = daemon_toml(docs)["daemon"]
    assert source_of(daemon["tls_cert_file"]) == ("trainguard-tls", "tls.crt")
    assert source_of(daemon["tls_key_file"]) == ("trainguard-tls", "tls.key")
    assert source_of(daemon["tls_client_ca_file"]) == ("training-clients-ca", "ca.crt")
    assert source_of(daemon["auth_tokens_file"]) == ("trainguard-tokens", "tokens.txt")
    # The client CA defaults to the ca.crt that cert-manager puts beside the certificate.
    same = daemon_toml(render(VARIANTS["tls-same-secret-ca"]))["daemon"]
    assert "auth_tokens_file" not in same
    sources = next(v for v in one(render(VARIANTS["tls-same-secret-ca"]), "StatefulSet")["spec"]["template"]["spec"][
        "volumes"] if v["name"] == "tls")["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources] == ["tg-tls", "tg-tls"]
    assert same["tls_client_ca_file"].endswith("/" + sources[1]["secret"]["items"][0]["path"])


def test_image_and_pod_placement(all_values: dict[str, Any]) -> None:
    assert container(render())["image"] == "ghcr.io/trainguard/trainguard:0.1.0"
    assert container(render({"image": {"tag": "0.2.0"}}))["image"] == "ghcr.io/trainguard/trainguard:0.2.0"
    docs = render(all_values)
    c = container(docs)
    assert c["image"] == "registry.example.com/ml/trainguard@" + all_values["image"]["digest"]
    assert c["imagePullPolicy"] == "Always"
    pod = one(docs, "StatefulSet")["spec"]["template"]
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName",
                "terminationGracePeriodSeconds"):
        assert pod["spec"][key] == all_values[key], key
    assert pod["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    assert pod["metadata"]["labels"]["team"] == "ml-platform"
    assert {"name": "TZ", "value": "UTC"} in c["env"]
    assert {"name": "TRAINGUARD_LOG_LEVEL", "value": "DEBUG"} in c["env"]
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == all_values["serviceAccount"]["annotations"]
    no_sa = render(VARIANTS["no-service-account"])
    assert "ServiceAccount" not in {d["kind"] for d in no_sa}
    assert one(no_sa, "StatefulSet")["spec"]["template"]["spec"]["serviceAccountName"] == "shared"


# ---------------------------------------------------------------------------------------------------------------
# Prometheus Operator and Grafana objects

def test_service_monitor_scrapes_the_service(all_values: dict[str, Any]) -> None:
    docs = render(all_values)
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == "monitoring"
    # kube-prometheus-stack selects on release=<its release name>.
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["port"] == "http"
    assert ep["path"] == "/metrics"
    assert (ep["interval"], ep["scrapeTimeout"], ep["honorLabels"]) == ("15s", "10s", True)
    assert ep["relabelings"] == all_values["serviceMonitor"]["relabelings"]
    assert ep["metricRelabelings"] == all_values["serviceMonitor"]["metricRelabelings"]
    # The daemon speaks TLS with every option on: the scrape does too, trusting and authenticating as told.
    assert ep["scheme"] == "https"
    assert ep["tlsConfig"] == all_values["serviceMonitor"]["tlsConfig"]
    assert ep["authorization"] == all_values["serviceMonitor"]["authorization"]
    assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                       "metricRelabelings", "tlsConfig", "authorization"}
    plain = one(render({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert plain["spec"]["endpoints"][0]["scheme"] == "http" and "tlsConfig" not in plain["spec"]["endpoints"][0]
    assert plain["metadata"]["namespace"] == NAMESPACE and "release" not in plain["metadata"]["labels"]
    assert "serviceMonitor.labels.release" in notes({"serviceMonitor": {"enabled": True}})
    assert "serviceMonitor.labels.release" not in notes(all_values)


def test_prometheus_rule_per_rule_file(all_values: dict[str, Any], fixture_chart: Path) -> None:
    docs = render(all_values, chart=fixture_chart)
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == "trainguard-all-fixture"
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # Annotations keep their Prometheus templates ({{ $labels.x }}) as they are: Helm must not expand them.
    assert rule["spec"] == {"groups": FIXTURE_RULES["groups"]}
    assert not [d for d in render({}, chart=fixture_chart) if d["kind"] == "PrometheusRule"]


def test_rule_file_errors_name_the_file(fixture_chart: Path, tmp_path: Path) -> None:
    chart = tmp_path / "trainguard"
    shutil.copytree(fixture_chart, chart)
    (chart / "rules" / "broken.yml").write_text("rules: [\n")
    with pytest.raises(helm_python.HelmError) as e:
        render({"prometheusRule": {"enabled": True}}, chart=chart)
    assert "rules/broken.yml" in str(e.value)


def test_dashboards_as_configmaps_for_the_grafana_sidecar(all_values: dict[str, Any], fixture_chart: Path) -> None:
    docs = render(all_values, chart=fixture_chart)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert cm["metadata"]["name"] == "trainguard-all-dashboard-fixture-runs"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(cm["data"]["Fixture_Runs.json"]) == FIXTURE_DASHBOARD
    custom = render({"dashboards": {"enabled": True, "label": "dashboards.example.com/grafana", "labelValue": "yes"}},
                    chart=fixture_chart)
    (cm,) = [d for d in custom if "-dashboard-" in d["metadata"]["name"]]
    assert cm["metadata"]["labels"]["dashboards.example.com/grafana"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert not [d for d in render({}, chart=fixture_chart) if "-dashboard-" in d["metadata"]["name"]]


def test_the_charts_own_dashboards_and_rules_become_objects(tmp_path: Path) -> None:
    # Whatever dashboards/ and rules/ hold: one object each, with the file's content.
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    rules = sorted((CHART / "rules").glob("*.yml"))
    docs = render({"dashboards": {"enabled": True}, "prometheusRule": {"enabled": True}})
    res = kubernetes_validate([d for d in docs if d["kind"] not in CUSTOM_KINDS], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    got = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ConfigMap", "PrometheusRule")}
    cms = [d for d in got.values() if "-dashboard-" in d["metadata"]["name"]]
    assert len(cms) == len(dashboards)
    for path in dashboards:
        (cm,) = [c for c in cms if path.name in c["data"]]
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
        assert len(path.read_bytes()) < 1 << 20  # a ConfigMap holds at most 1 MiB
    prs = [d for d in got.values() if d["kind"] == "PrometheusRule"]
    assert len(prs) == len(rules)
    for path in rules:
        assert {"groups": yaml.safe_load(path.read_text())["groups"]} in [p["spec"] for p in prs]


# ---------------------------------------------------------------------------------------------------------------
# NOTES.txt and docs

def test_notes_give_the_address_the_client_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    text = notes()
    address = f"{RELEASE}.{NAMESPACE}.svc:9751"
    assert f'name: TRAINGUARD_ADDRESS\n         value: "{address}"' in text
    # The variable NOTES names is the one a Reporter in a training job really reads.
    monkeypatch.setenv("TRAINGUARD_ADDRESS", address)
    assert Reporter(run="notes-check", start=False).address == address
    assert f"port-forward svc/{RELEASE} 9750:9750" in text
    assert "/metrics" in text and "/api/v1/alerts" in text
    assert "config.daemon.alertmanager_urls" in text


def test_notes_say_what_a_job_needs_to_authenticate(all_values: dict[str, Any]) -> None:
    plain = notes()
    assert "WARNING: no client authentication" in plain and "--insecure" in plain
    secured = notes(all_values)
    assert "WARNING: no client authentication" not in secured
    # The variables NOTES names are the ones the client reads.
    for var in ("TRAINGUARD_TOKEN", "TRAINGUARD_TLS_CA", "TRAINGUARD_TLS_CERT", "TRAINGUARD_TLS_KEY"):
        assert var in secured
        assert var in (ROOT / "monitor" / "client" / "security.py").read_text()
    assert "https://127.0.0.1:" in secured and "http://127.0.0.1:" not in secured


# Passed through to Kubernetes (or, for config, to the daemon) whole; their docs are Kubernetes' and the daemon's.
WHOLE = {"config", "resources", "podSecurityContext", "securityContext"}


def leaf_keys(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in WHOLE:
            yield from leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_docs_describe_every_value() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [k for k in leaf_keys(defaults) if f"`{k}`" not in doc]
    assert missing == []
