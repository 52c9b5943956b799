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

from alignedserve.config import EngineKnobs, ServeConfig

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "alignedserve"
HELM = REPO / ".tools" / "bin" / "helm"
SCHEMAS = REPO.parent / "shared" / "schemas"  # CI: a fresh clone with shared/ beside it
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BIN = Path(sys.executable).parent
# ServeConfig fields the chart sets itself instead of taking them from `serveConfig`.
CHART_MANAGED = {"host", "http_port", "grpc_port", "kv_grpc_port", "proxy_location",
                 "start_redis", "ray_address", "redis_url",
                 "api_key"}
CORE_KINDS = {"Service", "StatefulSet", "Secret", "ConfigMap", "PodDisruptionBudget",
              "Ingress", "Pod", "NetworkPolicy"}


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.is_file():
        subprocess.run([sys.executable, str(REPO / "helm" / "install_helm.py"), "--dest",
                        str(HELM.parent), "--pip", str(BIN / "pip")], check=True)
    return HELM


def _render(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), "template", "rel", str(CHART), "--namespace", "llm",
                           *args], capture_output=True, text=True, timeout=60)


def _docs(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = _render(helm, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _serve_app(rayservice: dict[str, Any]) -> dict[str, Any]:
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = cfg["applications"]
    return app


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict[str, Any]]]:
    assert {p.stem for p in CI_VALUES} >= {"defaults", "gpus", "external-redis",
                                           "monitoring-on"}
    return {p.stem: _docs(helm, "-f", str(p)) for p in CI_VALUES}


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
    rs = _one(rendered["defaults"], "RayService")
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
    out = _render(helm, *args)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "redis.enabled=false"], "set redis.external.url or redis.external.existingSecret"),
    (["--set", "serveConfig.replica_gpus=1"], "GPUs: num_replicas * (replica_gpus + worker_gpus)"),
    (["--set", "rayWorker.memoryGiB=2"], "must exceed the worker's /dev/shm"),
])
def test_values_that_cannot_work_together_fail_the_render(helm, args, message):
    out = _render(helm, *args)
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
        rs = _one(docs, "RayService")
        app = _serve_app(rs)
        assert app["import_path"] == "alignedserve.deployments.app:build"
        assert app["name"] == _app_constant("APP_NAME")
        args = app["args"]
        assert "redis_url" not in args and "redis://" not in rs["spec"]["serveConfigV2"], name
        cfg = ServeConfig.model_validate(args)  # extra="forbid": unknown args fail here
        assert cfg.start_redis is False and cfg.host == "0.0.0.0"
        values = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) or {}
        for key, want in (values.get("serveConfig") or {}).items():
            got = getattr(cfg, key)
            if isinstance(want, dict):
                assert got.model_dump() | want == got.model_dump(), (name, key)
            else:
                assert got == want, (name, key)


def _app_constant(name: str) -> str:
    """A string constant of deployments/app.py (the Serve app the chart deploys), read from
    the source so the test does not start Serve."""
    import ast

    tree = ast.parse((REPO / "deployments" / "app.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
                name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"deployments/app.py has no {name}")


def _containers(rs: dict[str, Any]) -> list[tuple[dict, dict]]:
    rc = rs["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_redis_url_reaches_ray_containers_only_through_the_environment(rendered):
    for name, docs in rendered.items():
        rs = _one(docs, "RayService")
        for _, c in _containers(rs):
            env = {e["name"]: e for e in c["env"]}
            url = env["ALIGNEDSERVE_REDIS_URL"]
            if name == "external-redis":
                assert url["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}
            else:
                assert url["value"].startswith("redis://:$(REDIS_PASSWORD)@rel-alignedserve-"
                                               "redis.llm.svc:6379/")
                assert list(env).index("REDIS_PASSWORD") < list(env).index(
                    "ALIGNEDSERVE_REDIS_URL")  # Kubernetes expands $(VAR) from earlier vars


def test_api_key_reaches_ray_containers_and_the_test_pod_only_from_its_secret(rendered):
    for name, docs in rendered.items():  # ci/external-redis.yaml sets apiKey.existingSecret
        rs = _one(docs, "RayService")
        assert "api_key" not in rs["spec"]["serveConfigV2"]
        for c in [c for _, c in _containers(rs)] + _one(docs, "Pod")["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            key = env.get("ALIGNEDSERVE_API_KEY") or env.get("API_KEY")
            want = {"name": "llm-api-key", "key": "api-key"} if name == "external-redis" else None
            assert (key and key["valueFrom"]["secretKeyRef"]) == want, (name, c["name"])


def test_external_redis_url_goes_into_a_secret(helm):
    docs = _docs(helm, "--set", "redis.enabled=false",
                 "--set", "redis.external.url=redis://:pw@redis.example:6379/2")
    secret = _one(docs, "Secret")
    assert secret["metadata"]["name"] == "rel-alignedserve-redis-url"
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    rs = _one(docs, "RayService")
    for _, c in _containers(rs):
        ref = {e["name"]: e for e in c["env"]}["ALIGNEDSERVE_REDIS_URL"]["valueFrom"]
        assert ref["secretKeyRef"]["name"] == "rel-alignedserve-redis-url"
    assert "pw@" not in yaml.safe_dump(rs)


def test_rayservice_shape(rendered):
    rs = _one(rendered["defaults"], "RayService")
    spec = rs["spec"]
    rc = spec["rayClusterConfig"]
    head, (workers,) = rc["headGroupSpec"], rc["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["name"]: p["containerPort"]
                  for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == {"serve": 8000, "serve-grpc": 9000, "dashboard": 8265,
                          "metrics": 8080, "gcs-server": 6379}
    svc_ports = {p["name"]: p for p in spec["serveService"]["spec"]["ports"]}
    assert svc_ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert svc_ports["serve"]["port"] == 8000
    grpc = yaml.safe_load(spec["serveConfigV2"])["grpc_options"]
    assert grpc["port"] == 9000
    assert grpc["grpc_servicer_functions"] == [_app_constant("GRPC_SERVICER")]
    cfg = ServeConfig.model_validate(_serve_app(rs)["args"])
    for group in (head, workers):
        pod = group["template"]["spec"]
        (c,) = pod["containers"]
        sleep_s = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert cfg.drain_timeout_s < sleep_s < pod["terminationGracePeriodSeconds"]
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm"}
    # host pool 2 GiB + 1 replica x 0.5 GiB device pool + 1 GiB object store + 0.5 headroom
    shm = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}["dshm"]["emptyDir"]
    assert shm["sizeLimit"] == f"{int(4.0 * 1024)}Mi"
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"][
        "limits"]


def test_gpu_values_reach_the_worker_group(rendered):
    rs = _one(rendered["gpus"], "RayService")
    (workers,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "2"
    assert workers["rayStartParams"]["num-gpus"] == "2"
    cfg = ServeConfig.model_validate(_serve_app(rs)["args"])
    # the GPUs requested cover every compute replica and prefetch worker
    assert cfg.num_replicas * (cfg.replica_gpus + cfg.worker_gpus) <= workers["replicas"] * 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in pod["affinity"]
    # 32 GiB host pool + 1 replica/pod x 20 GiB + 8 GiB object store + 0.5 GiB headroom
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
    assert shm["sizeLimit"] == f"{int(60.5 * 1024)}Mi"


def test_compute_nice_adds_sys_nice_only_while_set(rendered, helm):
    """Lowering the model-step threads' niceness below Ray's needs CAP_SYS_NICE in the
    containers that run replicas; with compute_nice null the chart asks for nothing."""
    def caps(docs):
        rc = _one(docs, "RayService")["spec"]["rayClusterConfig"]
        groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
        return [g["template"]["spec"]["containers"][0].get("securityContext", {}).get(
            "capabilities", {}).get("add") for g in groups]

    rs = _one(rendered["defaults"], "RayService")
    assert ServeConfig.model_validate(_serve_app(rs)["args"]).compute_nice is None
    assert caps(rendered["defaults"]) == [None, None]
    nice = _docs(helm, "--set", "serveConfig.compute_nice=0")
    assert ServeConfig.model_validate(_serve_app(_one(nice, "RayService"))["args"]
                                      ).compute_nice == 0
    assert caps(nice) == [["SYS_NICE"], ["SYS_NICE"]]


def test_redis_statefulset_and_kept_password(rendered):
    docs = rendered["defaults"]
    sts = _one(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("docker.io/library/redis:")
    args = c["args"]
    for flag, value in (("--appendonly", "yes"), ("--appendfsync", "everysec"),
                        ("--maxmemory-policy", "noeviction")):
        assert args[args.index(flag) + 1] == value
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    secret = _one(docs, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    template = (CHART / "templates" / "redis-secret.yaml").read_text()
    assert 'lookup "v1" "Secret"' in template  # an upgrade reuses the stored password


def test_monitors_pdb_and_policies_select_by_chart_labels(rendered):
    docs = rendered["monitoring-on"]
    rs = _one(docs, "RayService")
    sel = {"app.kubernetes.io/name": "alignedserve", "app.kubernetes.io/instance": "rel"}
    head_labels = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"][
        "labels"]
    (wg,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker_labels = wg["template"]["metadata"]["labels"]
    pm = _one(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == sel
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    (metrics_svc,) = [d for d in docs if d["kind"] == "Service"
                      and d["metadata"]["name"].endswith("-metrics")]
    assert metrics_svc["spec"]["selector"].items() <= head_labels.items()
    sm = _one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"][
        "labels"].items()
    dump = yaml.safe_dump(docs)
    assert "ray.io/cluster" not in dump  # the RayCluster name changes on every upgrade
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        assert np["spec"]["podSelector"]["matchLabels"].items() >= sel.items()
    ingress = _one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-alignedserve-serve-svc", "port": {"name": "serve"}}


def test_grafana_dashboard_configmap(rendered):
    cm = _one(rendered["defaults"], "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["alignedserve.json"])
    assert dash == json.loads((CHART / "dashboards" / "alignedserve.json").read_text())
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("ttft", "tpot", "itl", "throughput", "queue depths", "kv cache usage",
                  "batch alignment", "prefetch hit rate", "switches"):
        assert topic in titles, topic


def test_helm_test_hook_calls_the_openai_api(rendered):
    pod = _one(rendered["defaults"], "Pod")
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
