"""The k8s/ manifests, validated offline against the KubeRay CRD schemas (unknown fields are errors)
and KubeRay's own admission rules, and their Serve configs against Ray's Serve schema (unknown keys
are errors) and the contracts with cluster.serve_app:build_app and the example cluster description."""

from __future__ import annotations

import importlib
import importlib.util
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.k8s.strict import (crd_validator, label_errors, make_strict, parse_quantity, schema_errors,
                              serve_config_errors)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# the shared folder sits beside the checkout (or, on a device machine, inside it)
CRD_DIR = next((p for p in (ROOT.parent / "shared" / "kuberay-crds", ROOT / "shared" / "kuberay-crds")
                if p.is_dir()), ROOT.parent / "shared" / "kuberay-crds")
EXAMPLE_CLUSTER = ROOT / "cluster" / "clusters" / "example-hetero.yaml"
MANIFESTS = {"rayservice.yaml": "RayService", "raycluster.yaml": "RayCluster"}
NAME_LIMITS = {"RayCluster": 53, "RayService": 47}  # KubeRay: longer names break derived pod names
LABEL_KEY = "moe-serve/node-kind"
BUILDER = "cluster.serve_app:build_app"
GRPC_SERVICERS = ["protos.moe_serve_pb2_grpc.add_MoeServeServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*$")
BUILD_ARGS = {"model": str, "engine": ("inprocess", "ray"), "cluster": str,
              "dtype": ("float32", "bfloat16"), "max_model_len": int, "kv_cache_tokens": int,
              "served_model_name": str}
RAY_START_RESOURCE_KEYS = ("num-cpus", "num-gpus", "memory", "resources")


def _load(name: str) -> dict:
    docs = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{name}: expected one YAML mapping"
    return docs[0]


def _cluster(manifest: dict) -> dict:
    """The RayCluster spec inside a RayCluster or RayService manifest."""
    return manifest["spec"]["rayClusterConfig"] if manifest["kind"] == "RayService" else manifest["spec"]


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _pod(group: dict) -> dict:
    return group["template"]["spec"]


def _limits(group: dict) -> dict:
    """Resource limits of the group's Ray container (KubeRay's container index 0)."""
    return _pod(group)["containers"][0]["resources"]["limits"]


def _by_kind(spec: dict) -> dict[str, dict]:
    """Ray node kind (the group's moe-serve/node-kind label) -> group spec."""
    return {group.get("labels", {}).get(LABEL_KEY): group for _, group in _groups(spec)}


def _serve_configs() -> dict[str, dict]:
    configs = {name: _load(name) for name in ("serve-config.yaml", "serve-config-local.yaml")}
    embedded = _load("rayservice.yaml")["spec"]["serveConfigV2"]
    configs["rayservice.yaml:serveConfigV2"] = yaml.safe_load(embedded)
    return configs


@pytest.fixture(scope="module")
def validators():
    """kind -> strict validator, built once (the two CRDs are ~1 MB each)."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found in {CRD_DIR} (the shared folder is absent)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crds = [yaml.load(p.read_text(), Loader=loader) for p in sorted(CRD_DIR.glob("*.yaml"))]
    found = {crd["spec"]["names"]["kind"]: crd for crd in crds
             if isinstance(crd, dict) and crd.get("kind") == "CustomResourceDefinition"}
    missing = set(MANIFESTS.values()) - set(found)
    assert not missing, f"{CRD_DIR}: no CRD for {sorted(missing)}"
    return {kind: crd_validator(found[kind], NAME_LIMITS[kind]) for kind in MANIFESTS.values()}


# ---- KubeRay CRD schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_crd_schema(validators, name):
    manifest = _load(name)
    assert manifest["kind"] == MANIFESTS[name]
    assert schema_errors(validators[manifest["kind"]], manifest) == []


UNKNOWN_FIELD_SITES = {  # site -> the mapping of a manifest that gets an unknown field
    "metadata": lambda m: m["metadata"],
    "manifest-spec": lambda m: m["spec"],
    "cluster-spec": _cluster,
    "autoscaler": lambda m: _cluster(m)["autoscalerOptions"],
    "head-group": lambda m: _cluster(m)["headGroupSpec"],
    "worker-group": lambda m: _cluster(m)["workerGroupSpecs"][-1],
    "head-container": lambda m: _pod(_cluster(m)["headGroupSpec"])["containers"][0],
    "worker-resources": lambda m: _pod(_cluster(m)["workerGroupSpecs"][0])["containers"][0]["resources"],
    "worker-pod": lambda m: _pod(_cluster(m)["workerGroupSpecs"][0]),
}


@pytest.mark.parametrize("site", UNKNOWN_FIELD_SITES)
@pytest.mark.parametrize("name", MANIFESTS)
def test_unknown_field_is_rejected(validators, name, site):
    manifest = _load(name)
    UNKNOWN_FIELD_SITES[site](manifest)["notAKubeRayField"] = "x"
    errors = schema_errors(validators[manifest["kind"]], manifest)
    assert len(errors) == 1 and "notAKubeRayField" in errors[0], errors


@pytest.mark.parametrize("mutate", [
    lambda spec: spec["workerGroupSpecs"][0].update(minReplicas="2"),
    lambda spec: _limits(spec["workerGroupSpecs"][0]).update(memory="64GB"),
    lambda spec: spec["autoscalerOptions"].update(upscalingMode="Eager"),
    lambda spec: spec["headGroupSpec"].pop("template"),
], ids=["int-as-string", "bad-quantity", "bad-enum", "missing-required"])
def test_wrong_values_are_rejected(validators, mutate):
    manifest = _load("rayservice.yaml")
    mutate(_cluster(manifest))
    assert schema_errors(validators["RayService"], manifest)


def test_make_strict_follows_structural_schema_rules():
    schema = make_strict({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "maybe": {"type": "string", "nullable": True},
        "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        "description": {"type": "string", "description": "a field named like a keyword"}}})
    validator = jsonschema.Draft7Validator(schema)
    good = {"port": "http", "free": {"b": 1}, "maybe": None, "tags": {"x": "y"}, "description": "d"}
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({"port": 8000})) == []
    for bad in ({"port": 1.5}, {"other": 1}, {"maybe": 3}, {"tags": {"x": 1}}):
        assert list(validator.iter_errors(bad)), bad


def test_quantity_and_label_syntax():
    assert parse_quantity("500m") == 0.5 and parse_quantity("64Gi") == 64 * 2**30
    assert parse_quantity("1e3") == 1000 and parse_quantity("2k") == 2000 and parse_quantity(4) == 4
    assert parse_quantity("1E") == 1e18 and parse_quantity("1Ei") == 2**60 and parse_quantity("2E3") == 2000
    for bad in ("64GB", "1.2.3", "", "Gi"):
        with pytest.raises(ValueError, match="quantity"):
            parse_quantity(bad)
    assert label_errors({"moe-serve/node-kind": "cpu-highmem", "ray.io/x": ""}, "g") == []
    assert len(label_errors({"moe serve/kind": "gpu", "k": "-gpu", "Bad_Prefix/k": "x" * 64}, "g")) == 4


# ---- KubeRay's admission rules and the heterogeneous layout ------------------------------------


def _container_errors(where: str, container: dict) -> list[str]:
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    errors = [f"{where}: request {k}={v} exceeds its limit" for k, v in requests.items()
              if k in limits and parse_quantity(v) > parse_quantity(limits[k])]
    return errors + [f"{where}: no {key} limit" for key in ("cpu", "memory") if key not in limits]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_admission_rules(name):
    spec, errors = _cluster(_load(name)), []
    for group_name, group in _groups(spec):
        params, resources = group.get("rayStartParams", {}), group.get("resources", {})
        if "labels" in params:
            errors.append(f"{group_name}: rayStartParams['labels'] is rejected; use the group's labels")
        if resources and any(k in params for k in RAY_START_RESOURCE_KEYS):
            errors.append(f"{group_name}: resources set both in rayStartParams and in resources")
        errors += label_errors(group.get("labels", {}), group_name)
        errors += [f"{group_name}: {k}={v!r}" for k, v in resources.items() if parse_quantity(v) <= 0]
        for container in _pod(group)["containers"]:
            errors += _container_errors(f"{group_name}/{container['name']}", container)
        if spec["autoscalerOptions"].get("version") == "v2":
            assert _pod(group).get("restartPolicy", "Never") == "Never", "autoscaler v2 needs restartPolicy Never"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    assert len({g for g, _ in _groups(spec)}) == len(_groups(spec)), "group names must be unique"
    assert errors == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_heterogeneous_groups(name):
    spec = _cluster(_load(name))
    kinds = _by_kind(spec)
    assert set(kinds) == {"head", "gpu", "cpu-highmem"}
    assert kinds["head"] is spec["headGroupSpec"] and kinds["head"]["rayStartParams"]["num-cpus"] == "0"
    assert parse_quantity(_limits(kinds["gpu"])["nvidia.com/gpu"]) >= 1
    highmem = kinds["cpu-highmem"]
    assert "nvidia.com/gpu" not in _limits(highmem)
    assert parse_quantity(highmem["resources"]["cpu_highmem"]) >= 1
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == version("ray")
    images = {c["image"] for _, g in _groups(spec) for c in _pod(g)["containers"]}
    assert len(images) == 1, f"every Ray node runs the one moe-serve image, got {images}"


def test_rayservice_and_raycluster_share_the_cluster_spec():
    assert _cluster(_load("rayservice.yaml")) == _cluster(_load("raycluster.yaml"))


def test_head_ports_match_the_serve_config():
    head = _pod(_cluster(_load("rayservice.yaml"))["headGroupSpec"])["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    config = _serve_configs()["rayservice.yaml:serveConfigV2"]
    assert ports["serve"] == config["http_options"]["port"] == 8000
    assert ports["serve-grpc"] == config["grpc_options"]["port"] == 9000


@pytest.mark.parametrize("name", MANIFESTS)
def test_groups_match_the_example_cluster_description(name):
    if not EXAMPLE_CLUSTER.is_file():
        pytest.skip(f"{EXAMPLE_CLUSTER} not written yet")
    described = yaml.safe_load(EXAMPLE_CLUSTER.read_text())
    assert described.get("label_key", LABEL_KEY) == LABEL_KEY
    kinds = _by_kind(_cluster(_load(name)))
    assert set(kinds) == {node["kind"] for node in described["nodes"]}
    for node in described["nodes"]:
        group = kinds[node["kind"]]
        count = node.get("count", 1)
        if node["kind"] == "head":
            assert count == 1
        else:
            assert group["minReplicas"] <= count <= group["maxReplicas"], node["kind"]
        for resource, amount in node.get("resources", {}).items():
            assert parse_quantity(group.get("resources", {}).get(resource, "0")) >= amount, (node["kind"], resource)
        limits = _limits(group)
        assert ("nvidia.com/gpu" in limits) == (node.get("device") == "cuda"), node["kind"]
        if node.get("device", "cpu") == "cpu" and node.get("role") != "none":
            assert parse_quantity(limits["memory"]) > node["memory_gb"] * 2**30, node["kind"]


# ---- Ray Serve configs -------------------------------------------------------------------------


@pytest.mark.parametrize("label", _serve_configs())
def test_serve_config_matches_ray_schema(label):
    assert serve_config_errors(_serve_configs()[label]) == []


def _deployment(**options):
    return lambda c: c["applications"][0].update(deployments=[{"name": "X", **options}])


SERVE_UNKNOWN_SITES = {  # name -> (mutation, the unknown key's dotted path)
    "top": (lambda c: c.update(proxy_locaton="HeadOnly"), "proxy_locaton"),
    "http": (lambda c: c["http_options"].update(prot=1), "http_options.prot"),
    "grpc": (lambda c: c["grpc_options"].update(servicers=[]), "grpc_options.servicers"),
    "app": (lambda c: c["applications"][0].update(arguments={}), "applications.0.arguments"),
    "actor-options": (_deployment(ray_actor_options={"num_cpu": 1}),
                      "applications.0.deployments.0.ray_actor_options.num_cpu"),
    "autoscaling": (_deployment(autoscaling_config={"max_replica": 2}),
                    "applications.0.deployments.0.autoscaling_config.max_replica"),
}


@pytest.mark.parametrize("site", SERVE_UNKNOWN_SITES)
@pytest.mark.parametrize("label", _serve_configs())
def test_serve_config_unknown_key_is_rejected(label, site):
    config = _serve_configs()[label]
    mutate, path = SERVE_UNKNOWN_SITES[site]
    mutate(config)
    errors = serve_config_errors(config)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:"), errors


def test_embedded_serve_config_equals_serve_config_file():
    configs = _serve_configs()
    assert configs["rayservice.yaml:serveConfigV2"] == configs["serve-config.yaml"]


@pytest.mark.parametrize("label", _serve_configs())
def test_applications_use_the_build_app_contract(label):
    config = _serve_configs()[label]
    engine = "inprocess" if "local" in label else "ray"
    for app in config["applications"]:
        assert app["import_path"] == BUILDER
        args = app.get("args", {})
        assert set(args) <= set(BUILD_ARGS), f"unknown build_app args {set(args) - set(BUILD_ARGS)}"
        for key, value in args.items():
            expected = BUILD_ARGS[key]
            assert value in expected if isinstance(expected, tuple) else type(value) is expected, (key, value)
        assert args["engine"] == engine
        assert args["kv_cache_tokens"] >= args["max_model_len"] > 0, "the KV cache must hold one full sequence"
        if engine == "ray":
            assert args["cluster"] == "example-hetero"


@pytest.mark.parametrize("label", _serve_configs())
def test_grpc_options(label):
    options = _serve_configs()[label]["grpc_options"]
    assert options["port"] == 9000
    assert options["grpc_servicer_functions"] == GRPC_SERVICERS
    assert all(IMPORT_PATH.match(f) for f in options["grpc_servicer_functions"])


@pytest.mark.parametrize("path", GRPC_SERVICERS)
def test_grpc_servicer_functions_resolve(path):
    module, _, attr = path.replace(":", ".").rpartition(".")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not importable here")
    assert callable(getattr(importlib.import_module(module), attr))
