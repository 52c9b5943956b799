"""The Helm chart, checked offline with real helm (`make tools` installs it into .tools/):
lint, render every ci/*.yaml, validate what renders (KubeRay's RayService schema with the
operator's admission checks, prometheus-operator's monitors, core kinds with
kubernetes-validate), reject bad values with helm's own message, and keep the chart's
serve-config block, the Serve app's args and ServeConfig in agreement.

The dashboard's metric names are checked against a live server's /metrics in
tests/test_locust.py, which runs one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import (
    BIN,
    CHART,
    CHART_MANAGED,
    CI_VALUES,
    CORE_KINDS,
    REPO,
    SCHEMAS,
    app_constant,
    one,
    render,
    serve_app,
)

from alignedserve.config import EngineKnobs, ServeConfig


def test_lint_strict(helm):
    for values in [None, *CI_VALUES]:
        args = [] if values is None else ["-f", str(values)]
        out = subprocess.run([str(helm), "lint", "--strict", str(CHART), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (values, out.stdout, out.stderr)


def _check_jsonschema(schema: str, files: list[Path]) -> None:
    # check-jsonschema resolves the schemas' relative $refs against the working directory.
    out = subprocess.run([str(BIN / "check-jsonschema"), "--schemafile", schema,
                          *map(str, files)], cwd=SCHEMAS, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rendered_objects_pass_their_schemas(rendered, tmp_path):
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent (the offline KubeRay/prometheus-operator schemas "
                    "live in shared/, beside the repository)")
    by_schema: dict[str, list[Path]] = {}
    core: list[Path] = []
    for name, docs in rendered.items():
        for i, doc in enumerate(docs):
            f = tmp_path / f"{name}-{i}-{doc['kind']}.yaml"
            f.write_text(yaml.safe_dump(doc))
            if doc["kind"] == "RayService":
                by_schema.setdefault("rayservice.chart-checks.schema.json", []).append(f)
            elif doc["kind"] in ("PodMonitor", "ServiceMonitor"):
                by_schema.setdefault(f"{doc['kind'].lower()}.strict.schema.json", []).append(f)
            else:
                assert doc["kind"] in CORE_KINDS, doc["kind"]
                core.append(f)
    assert len(by_schema["rayservice.chart-checks.schema.json"]) == len(rendered)
    assert by_schema["podmonitor.strict.schema.json"]
    assert by_schema["servicemonitor.strict.schema.json"]
    for schema, files in by_schema.items():
        _check_jsonschema(schema, files)
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.33.0",
                          *map(str, core)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" passed for resource ") == len(core), out.stdout


def test_a_bad_rayservice_fails_the_schema_check(rendered, tmp_path):
    """The schema check above can fail: a null in an optional field (a template bug)."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent")
    rs = one(rendered["defaults"], "RayService")
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["nodeName"] = None
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(rs))
    with pytest.raises(AssertionError, match="nodeName"):
        _check_jsonschema("rayservice.chart-checks.schema.json", [f])


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "serveConfg.num_replicas=2"], "additional properties 'serveConfg' not allowed"),
    (["--set", "serveConfig.engine.min_batch=0"],
     "at '/serveConfig/engine/min_batch': minimum: got 0, want 1"),
    (["--set", "serveConfig.redis_url=redis://x:6379/0"],
     "additional properties 'redis_url' not allowed"),
    (["--set", "rayWorker.gpus=-1"], "at '/rayWorker/gpus': minimum: got -1, want 0"),
    (["--set", "upgradeStrategy=Rolling"], "at '/upgradeStrategy'"),
    (["--set-string", "ports.http=80a"], "at '/ports/http': got string, want integer"),
    (["--set", "redis.external.url=http://x"], "at '/redis/external/url'"),
])
def test_values_that_break_the_schema_are_rejected(helm, args, message):
    out = render(helm, *args)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "redis.enabled=false"], "set redis.external.url or redis.external.existingSecret"),
    (["--set", "serveConfig.replica_gpus=1"], "GPUs: num_replicas * (replica_gpus + worker_gpus)"),
    (["--set", "rayWorker.memoryGiB=2"], "must exceed the worker's /dev/shm"),
])
def test_values_that_cannot_work_together_fail_the_render(helm, args, message):
    out = render(helm, *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_values_schema_is_closed_and_self_contained():
    schema = json.loads((CHART / "values.schema.json").read_text())
    refs = re.findall(r'"\$ref":\s*"([^"]+)"', json.dumps(schema))
    assert refs and all(r.startswith("#/") for r in refs), refs  # no remote $ref

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                extra = node.get("additionalProperties")
                # closed, or a map whose values are typed (labels, nodeSelector)
                assert extra is False or (isinstance(extra, dict) and extra), path
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "")
    assert not (CHART / "charts").exists()
    assert "dependencies" not in yaml.safe_load((CHART / "Chart.yaml").read_text())


def test_schema_serve_config_and_serve_config_fields_agree():
    schema = json.loads((CHART / "values.schema.json").read_text())
    serve = schema["definitions"]["serveConfig"]["properties"]
    engine = schema["definitions"]["engine"]["properties"]
    assert set(serve) | CHART_MANAGED == set(ServeConfig.model_fields)
    assert not set(serve) & CHART_MANAGED
    assert set(engine) == set(EngineKnobs.model_fields)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["serveConfig"]
    assert set(values) == set(serve) and set(values["engine"]) == set(engine)
    for name, prop in serve.items():  # every field documented in the schema
        assert prop.get("description") or prop.get("$ref"), name


def test_serve_args_validate_as_serve_config(rendered):
    for name, docs in rendered.items():
        rs = one(docs, "RayService")
        app = serve_app(rs)
        assert app["import_path"] == "alignedserve.deployments.app:build"
        assert app["name"] == app_constant("APP_NAME")
        args = app["args"]
        assert "redis_url" not in args and "redis://" not in rs["spec"]["serveConfigV2"], name
        cfg = ServeConfig.model_validate(args)  # extra="forbid": unknown args fail here
        assert cfg.start_redis is False and cfg.host == "0.0.0.0"
        assert cfg.ingress == "proxy"  # KubeRay's Services and probes reach Serve's proxies
        values = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) or {}
        for key, want in (values.get("serveConfig") or {}).items():
            got = getattr(cfg, key)
            if isinstance(want, dict):
                assert got.model_dump() | want == got.model_dump(), (name, key)
            else:
                assert got == want, (name, key)


def test_redis_statefulset_and_kept_password(rendered):
    docs = rendered["defaults"]
    sts = one(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("docker.io/library/redis:")
    args = c["args"]
    for flag, value in (("--appendonly", "yes"), ("--appendfsync", "everysec"),
                        ("--maxmemory-policy", "noeviction")):
        assert args[args.index(flag) + 1] == value
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    secret = one(docs, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    template = (CHART / "templates" / "redis-secret.yaml").read_text()
    assert 'lookup "v1" "Secret"' in template  # an upgrade reuses the stored password


def test_monitors_pdb_and_policies_select_by_chart_labels(rendered):
    docs = rendered["monitoring-on"]
    rs = one(docs, "RayService")
    sel = {"app.kubernetes.io/name": "alignedserve", "app.kubernetes.io/instance": "rel"}
    head_labels = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"][
        "labels"]
    (wg,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker_labels = wg["template"]["metadata"]["labels"]
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == sel
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    (metrics_svc,) = [d for d in docs if d["kind"] == "Service"
                      and d["metadata"]["name"].endswith("-metrics")]
    assert metrics_svc["spec"]["selector"].items() <= head_labels.items()
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"][
        "labels"].items()
    dump = yaml.safe_dump(docs)
    assert "ray.io/cluster" not in dump  # the RayCluster name changes on every upgrade
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        assert np["spec"]["podSelector"]["matchLabels"].items() >= sel.items()
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-alignedserve-serve-svc", "port": {"name": "serve"}}


def test_grafana_dashboard_configmap(rendered):
    cm = one(rendered["defaults"], "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["alignedserve.json"])
    assert dash == json.loads((CHART / "dashboards" / "alignedserve.json").read_text())
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("ttft", "tpot", "itl", "throughput", "queue depths", "kv cache usage",
                  "batch alignment", "prefetch hit rate", "switches"):
        assert topic in titles, topic


def test_helm_test_hook_calls_the_openai_api(rendered):
    pod = one(rendered["defaults"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["BASE_URL"] == "http://rel-alignedserve-serve-svc:8000/v1"
    assert env["MODEL"] == "smollm2-135m"
    assert "/chat/completions" in c["args"][0]
    compile(c["args"][0], "helm-test", "exec")  # the inline script at least parses


def test_install_helm_pins_the_binary(helm):
    import hashlib

    sys.path.insert(0, str(REPO / "helm"))
    try:
        import install_helm
    finally:
        sys.path.remove(str(REPO / "helm"))
    assert hashlib.sha256(helm.read_bytes()).hexdigest() == install_helm.HELM_SHA256
    out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True)
    assert out.stdout.startswith(install_helm.HELM_VERSION)
    assert shutil.which("helm", path=str(helm.parent)) == str(helm)
