"""Offline checks of everything under deploy/ and of the API definition:
rendered Kubernetes manifests against the Kubernetes schemas (strict), KubeRay
objects against the CRD schemas with unknown fields refused, Dockerfiles
through hadolint, protos through buf lint, and manifests consistent with the
code (settings, ports, service names, images)."""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tunewire.services.common.settings import Settings
from tunewire.v1 import dataset_pb2, inference_pb2, training_pb2

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.37.0"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    for candidate in (BIN / name, REPO / ".tools" / "node_modules" / ".bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed: run `make install`"
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    return render(request.param)


def test_overlays_render_every_kind_needed(objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for service in ("dataset", "training", "inference"):
        for kind in ("Deployment", "Service", "ServiceAccount"):
            assert (kind, f"tunewire-{service}") in kinds
    assert {
        ("ConfigMap", "tunewire-config"),
        ("PersistentVolumeClaim", "tunewire-artifacts"),
        ("RayCluster", "tunewire-ray"),
        ("NetworkPolicy", "tunewire-default-deny"),
        ("NetworkPolicy", "tunewire-api"),
        ("NetworkPolicy", "tunewire-ray"),
    } <= kinds
    # Secrets are created by hand once: applying the manifests never puts placeholders over them.
    assert not [name for kind, name in kinds if kind == "Secret"]


def example_secrets() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d}


def test_secrets_the_pods_read_are_the_ones_the_readme_creates(objects):
    readme = (DEPLOY / "README.md").read_text()
    for name, secret in example_secrets().items():
        assert f"create secret generic {name}" in readme
        for key in secret["stringData"]:
            assert f"--from-literal={key}=" in readme or f"--from-file={key}" in readme, f"{name}.{key} is never created"
    referenced = {
        ref["name"]
        for o in objects
        for c in _containers(o)
        for ref in [s.get("secretRef") for s in c.get("envFrom", [])]
        + [e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])]
        if ref
    }
    assert referenced <= set(example_secrets())


def test_network_policies_keep_ray_to_the_orchestrator_and_deny_the_rest(objects):
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert policies["tunewire-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    ray = policies["tunewire-ray"]
    assert ray["podSelector"] == {"matchLabels": {"ray.io/cluster": "tunewire-ray"}}
    sources = [peer["podSelector"]["matchLabels"] for rule in ray["ingress"] for peer in rule["from"]]
    assert sources == [{"ray.io/cluster": "tunewire-ray"}, {"app.kubernetes.io/name": "tunewire-training"}]
    # The orchestrator's pod is a Ray node: the cluster's nodes, and only they, reach it beyond its API ports.
    node = policies["tunewire-training-ray-node"]
    assert node["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "tunewire-training"}}
    assert [peer["podSelector"]["matchLabels"] for rule in node["ingress"] for peer in rule["from"]] == [{"ray.io/cluster": "tunewire-ray"}]
    # The API policy opens ports by the names the containers give them.
    api_ports = {port["port"] for rule in policies["tunewire-api"]["ingress"] for port in rule["ports"]}
    named = {
        o["metadata"]["name"]: {p["name"] for p in o["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for o in objects
        if o["kind"] == "Deployment"
    }
    assert all(ports <= api_ports for ports in named.values()) and set().union(*named.values()) == api_ports
    assert named["tunewire-inference"] - named["tunewire-dataset"] == {"http"}  # the OpenAI-compatible API
    # Every Ray API, the dashboard's included, asks for the cluster's token; the orchestrator has the same one.
    [ray_cluster] = [o for o in objects if o["kind"] == "RayCluster"]
    assert ray_cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "tunewire-ray-token"}
    [training] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tunewire-training"]
    env = {e["name"]: e for e in training["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "tunewire-ray-token", "key": "auth_token"}


def test_kubernetes_objects_pass_strict_schema_validation(objects):
    deployments = []
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        deployments += [obj] if obj["kind"] == "Deployment" else []
    typo = copy.deepcopy(deployments[0])
    typo["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def closed_schema(schema):
    """The CRD schema with additionalProperties: false wherever properties are
    listed, so a misspelt field fails as it would not in the cluster."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_validator(kind_file: str, version: str = "v1") -> jsonschema.Validator:
    crd = yaml.safe_load((DEPLOY / "kuberay" / "crds" / kind_file).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(closed_schema(schema))


def test_raycluster_matches_the_kuberay_crd_with_unknown_fields_refused(objects):
    validator = crd_validator("ray.io_rayclusters.yaml")
    [cluster] = [o for o in objects if o["kind"] == "RayCluster"]
    errors = sorted(validator.iter_errors(cluster), key=str)
    assert not errors, [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 2
    assert not validator.is_valid(typo)


def test_gpu_overlay_asks_for_gpus():
    objects = render("gpu")
    [cluster] = [o for o in objects if o["kind"] == "RayCluster"]
    gpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    [inference] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tunewire-inference"]
    container = inference["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and container["image"].startswith("tunewire-cuda:")
    assert {"name": "TUNEWIRE_INFERENCE_DEVICE", "value": "cuda"} in container["env"]
    assert not any("nvidia.com/gpu" in str(o) for o in render("cpu"))


def test_containers_are_hardened(objects):
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]


SETTINGS_ENV = {("RAY_ADDRESS" if name == "ray_address" else f"TUNEWIRE_{name.upper()}") for name in Settings.model_fields}
# Read by Ray itself, in the orchestrator's process and its Ray node.
SETTINGS_ENV |= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
SERVICES = {
    "dataset": (dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name, Settings.model_fields["dataset_port"].default),
    "training": (training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name, Settings.model_fields["training_port"].default),
    "inference": (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name, Settings.model_fields["inference_port"].default),
}
# What each service cannot do without in a cluster (its default only works on one machine).
# The dataset service calls no other: it needs no key of its own.
AUTH = {"TUNEWIRE_API_KEYS_FILE", "TUNEWIRE_SERVICE_API_KEY"}
REQUIRED = {
    "dataset": {"TUNEWIRE_HOST", "TUNEWIRE_ARTIFACT_ROOT", "TUNEWIRE_DATASET_DATABASE_URL", "TUNEWIRE_API_KEYS_FILE"},
    "training": {"TUNEWIRE_HOST", "TUNEWIRE_ARTIFACT_ROOT", "TUNEWIRE_TRAINING_DATABASE_URL", "TUNEWIRE_DATASET_ADDRESS", "RAY_ADDRESS"}
    | AUTH,
    "inference": {"TUNEWIRE_HOST", "TUNEWIRE_ARTIFACT_ROOT", "TUNEWIRE_TRAINING_ADDRESS", "TUNEWIRE_BASE_MODEL"} | AUTH,
}


def container_env(container: dict, objects: list[dict]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            secret = example_secrets()[source["secretRef"]["name"]]
            names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    return names


def test_manifests_and_code_agree(objects):
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for name, (grpc_service, port) in SERVICES.items():
        pod = deployments[f"tunewire-{name}"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = container_env(container, objects)
        assert env <= SETTINGS_ENV, f"{name} sets variables no service reads: {env - SETTINGS_ENV}"
        assert REQUIRED[name] <= env, f"{name} lacks {REQUIRED[name] - env}"
        # The orchestrator's container first joins the Ray cluster as a node (no CPUs), then runs the service.
        command = container["command"] if name != "training" else ["python", *container["command"][-1].split("exec python")[-1].split()]
        assert command == ["python", "-m", f"tunewire.services.{name}"]
        if name == "training":
            assert container["command"][-1].startswith('ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0')
        assert container["ports"][0]["containerPort"] == port
        assert services[f"tunewire-{name}"]["spec"]["ports"][0]["port"] == port
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": grpc_service}
        # The keys file the settings name is the one mounted from the auth Secret.
        keys_file = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["TUNEWIRE_API_KEYS_FILE"]
        [mount] = [m for m in container["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/")]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "tunewire-auth"
        assert keys_file.endswith("/" + volume["secret"]["items"][0]["path"])
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    assert config["TUNEWIRE_DATASET_ADDRESS"] == f"tunewire-dataset:{SERVICES['dataset'][1]}"
    assert config["TUNEWIRE_TRAINING_ADDRESS"] == f"tunewire-training:{SERVICES['training'][1]}"
    # The head's GCS address, which the settings accept (Ray Client's ray:// they refuse).
    assert config["RAY_ADDRESS"] == "tunewire-ray-head-svc:6379"
    assert Settings(ray_address=config["RAY_ADDRESS"]).ray_address == config["RAY_ADDRESS"]
    for obj in objects:
        for container in _containers(obj):
            assert container_env(container, objects) <= SETTINGS_ENV
            image, tag = container["image"].rsplit(":", 1)
            assert image in ("tunewire", "tunewire-cuda") and tag == _version()


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "RayCluster":
        groups = [obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    return []


def _version() -> str:
    import tunewire

    return tunewire.__version__


def test_ray_version_matches_the_installed_ray():
    import ray

    [cluster] = [o for o in render("cpu") if o["kind"] == "RayCluster"]
    assert cluster["spec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("Dockerfile.*")), ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = dockerfile.read_text()
    assert "USER 10001" in text and "tunewire.services." in text


def test_every_image_runs_the_same_python_and_ray():
    """A Ray cluster refuses a node whose Python differs from the head's, and
    the CUDA image's GPU workers join the CPU image's head (Ray itself comes
    from pyproject.toml's pins in both)."""
    bases = {p.name: re.findall(r"^FROM (\S+)", p.read_text(), re.M) for p in (DEPLOY / "docker").glob("Dockerfile.*")}
    assert len(bases) == 2 and len({tuple(b) for b in bases.values()}) == 1, bases
    assert "qlora" in (DEPLOY / "docker" / "Dockerfile.cuda").read_text()


def test_protos_pass_buf_lint():
    out = subprocess.run(
        [tool("buf"), "lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BUF_CACHE_DIR": str(REPO / ".tools" / "buf-cache")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
