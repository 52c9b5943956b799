"""The Helm chart's Ray containers: how the RayService's pods are shaped, and what reaches
their environment (Redis URL and API key only from secrets or the environment, GPUs,
CAP_SYS_NICE while compute_nice is set). Rendered offline with real helm, as in
test_helm.py."""

from __future__ import annotations

import yaml
from helm_chart import app_constant, containers, docs_of, one, serve_app

from alignedserve.config import ServeConfig


def test_redis_url_reaches_ray_containers_only_through_the_environment(rendered):
    for name, docs in rendered.items():
        rs = one(docs, "RayService")
        for _, c in containers(rs):
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
        rs = one(docs, "RayService")
        assert "api_key" not in rs["spec"]["serveConfigV2"]
        for c in [c for _, c in containers(rs)] + one(docs, "Pod")["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            key = env.get("ALIGNEDSERVE_API_KEY") or env.get("API_KEY")
            want = {"name": "llm-api-key", "key": "api-key"} if name == "external-redis" else None
            assert (key and key["valueFrom"]["secretKeyRef"]) == want, (name, c["name"])


def test_serve_controller_loop_is_the_one_local_clusters_get(rendered):
    from alignedserve.deployments.app import SERVE_LOOP_ENV, SERVE_LOOP_S

    for docs in rendered.values():
        for _, c in containers(one(docs, "RayService")):
            assert {e["name"]: e for e in c["env"]}[SERVE_LOOP_ENV]["value"] == SERVE_LOOP_S


def test_external_redis_url_goes_into_a_secret(helm):
    docs = docs_of(helm, "--set", "redis.enabled=false",
                 "--set", "redis.external.url=redis://:pw@redis.example:6379/2")
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == "rel-alignedserve-redis-url"
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    rs = one(docs, "RayService")
    for _, c in containers(rs):
        ref = {e["name"]: e for e in c["env"]}["ALIGNEDSERVE_REDIS_URL"]["valueFrom"]
        assert ref["secretKeyRef"]["name"] == "rel-alignedserve-redis-url"
    assert "pw@" not in yaml.safe_dump(rs)


def test_rayservice_shape(rendered):
    rs = one(rendered["defaults"], "RayService")
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
    assert grpc["grpc_servicer_functions"] == [app_constant("GRPC_SERVICER")]
    cfg = ServeConfig.model_validate(serve_app(rs)["args"])
    for group in (head, workers):
        pod = group["template"]["spec"]
        (c,) = pod["containers"]
        sleep_s = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert cfg.drain_timeout_s < sleep_s < pod["terminationGracePeriodSeconds"]
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
        assert shm["medium"] == "Memory"
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm"}
    # host pool 2 GiB + 1 replica x 2 GiB device pool + 1 GiB object store + 0.5 headroom
    shm = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}["dshm"]["emptyDir"]
    assert shm["sizeLimit"] == f"{int(5.5 * 1024)}Mi"
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"][
        "limits"]


def test_gpu_values_reach_the_worker_group(rendered):
    rs = one(rendered["gpus"], "RayService")
    (workers,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "2"
    assert workers["rayStartParams"]["num-gpus"] == "2"
    cfg = ServeConfig.model_validate(serve_app(rs)["args"])
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
        rc = one(docs, "RayService")["spec"]["rayClusterConfig"]
        groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
        return [g["template"]["spec"]["containers"][0].get("securityContext", {}).get(
            "capabilities", {}).get("add") for g in groups]

    rs = one(rendered["defaults"], "RayService")
    assert ServeConfig.model_validate(serve_app(rs)["args"]).compute_nice is None
    assert caps(rendered["defaults"]) == [None, None]
    nice = docs_of(helm, "--set", "serveConfig.compute_nice=0")
    assert ServeConfig.model_validate(serve_app(one(nice, "RayService"))["args"]
                                      ).compute_nice == 0
    assert caps(nice) == [["SYS_NICE"], ["SYS_NICE"]]
