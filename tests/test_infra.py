"""Deployment files: ray_cluster.yaml (checked by Ray's own validator), infra/Dockerfile, KubeRay
manifests and the local stack. They must agree with each other and with the pinned versions, point
at modules/configs that exist, request GPUs, take credentials from references, and hold no secrets."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
KUBERAY = INFRA / "kuberay"
STACK = INFRA / "local-stack"
# A local infra/local-stack/.env is git-ignored and holds real local secrets by design: not scanned.
DEPLOY_FILES = [CLUSTER_YAML, *sorted(p for p in INFRA.rglob("*")
                                      if p.is_file() and p.name != ".env" and "__pycache__" not in p.parts)]


# ----------------------------------------------------------------------------- helpers
def load(path: Path) -> dict:
    [doc] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def pin(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"constraints.txt pins no {name}")


def build_script_vars() -> dict[str, str]:
    """Plain NAME="value" / NAME="${NAME:-value}" assignments of infra/build-image.sh."""
    text = (INFRA / "build-image.sh").read_text()
    out = {}
    for name, value in re.findall(r'^([A-Z_]+)="([^"$]*|\$\{[A-Z_]+:-[^}]*\})"$', text, re.M):
        out[name] = value.split(":-", 1)[1].rstrip("}") if value.startswith("${") else value
    return out


def expected_image() -> str:
    v = build_script_vars()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"{v['IMAGE_REPO']}:{version}-ray{pin('ray')}-{v['PYTHON_TAG']}-{v['CUDA_TAG']}"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def resolve_from(instructions: list[tuple[str, str]]) -> str:
    args: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if instr == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("no FROM")


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key`, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": load(KUBERAY / "raycluster.yaml")["spec"],
            "rayjob.yaml": load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]}


# ----------------------------------------------------------------------------- secrets detector
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_LIKE = re.compile(r"(?<![\w/+=.-])(?=[\w/+]*[a-z])(?=[\w/+]*[A-Z])(?=[\w/+]*\d)[A-Za-z0-9/+]{40}(?![\w/+=])")
ASSIGNMENT = re.compile(r"(?i)\b\w*(?:password|passwd|secret|token)\w*[\"']?\s*[:=]\s*[\"']?([^\s\"'#,]*)")
URL_PASSWORD = re.compile(r"://[^:/\s@]+:([^@\s/]+)@")


def is_reference_or_placeholder(value: str) -> bool:
    return (value == "" or value[0] in "$<{[|>" or "change-me" in value or "..." in value
            or value.lower() in ("true", "false", "null", "none"))


def literal_secrets(text: str) -> list[str]:
    found = AWS_KEY_ID.findall(text) + AWS_SECRET_LIKE.findall(text)
    found += [v for v in ASSIGNMENT.findall(text) if not is_reference_or_placeholder(v)]
    found += [v for v in URL_PASSWORD.findall(text) if not is_reference_or_placeholder(v)]
    return found


def test_secret_detector_catches_planted_secrets():
    planted = {
        "id": "aws_access_key_id: " + "AKIA" + "IOSFODNN7EXAMPLE",
        "secret": "key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "password": "  POSTGRES_PASSWORD: hunter2",
        "env": "MINIO_ROOT_PASSWORD=s3cr3t-value",
        "url": "uri: postgresql://mlflow:hunter2@db:5432/mlflow",
    }
    for name, text in planted.items():
        assert literal_secrets(text), name
    fine = ("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}\nAWS_SECRET_ACCESS_KEY: \"<your-secret>\"\n"
            "PASSWORD=change-me-x\nsecretKeyRef: {name: s3, key: AWS_SECRET_ACCESS_KEY}\n"
            "uri: postgresql://mlflow:${POSTGRES_PASSWORD}@db/mlflow\n"
            "ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver/ami-id")
    assert literal_secrets(fine) == []


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_literal_secrets(path):
    assert literal_secrets(path.read_text()) == [], f"{path.relative_to(ROOT)} holds a literal secret"


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("path", [p for p in DEPLOY_FILES if p.suffix in (".yaml", ".yml")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ----------------------------------------------------------------------------- ray_cluster.yaml
def prepared_cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(CLUSTER_YAML)))
    validate_config(config)
    return config


def test_ray_cluster_passes_ray_validation():
    config = prepared_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker group"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert "--gpus all" in t["docker"]["worker_run_options"], name
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: S3 access comes from an instance profile"
    assert "--gpus all" not in config["docker"]["run_options"]  # the CPU head has no GPU runtime
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_ray_cluster_image_commands_and_mounts():
    config = load(CLUSTER_YAML)
    assert config["docker"]["image"] == expected_image()
    assert config["file_mounts"] == {"/home/ray/crossdim-src": "."}
    assert any("--no-deps -e /home/ray/crossdim-src" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    run_options = " ".join(config["docker"]["run_options"])
    assert "AWS_ACCESS_KEY_ID" not in run_options and "AWS_SECRET_ACCESS_KEY" not in run_options
    assert "MLFLOW_TRACKING_URI=" not in CLUSTER_YAML.read_text()  # given per job, not baked in


def test_ray_validator_rejects_broken_configs():
    from ray.autoscaler._private.util import prepare_config, validate_config

    fractional_gpu = load(CLUSTER_YAML)
    fractional_gpu["available_node_types"]["gpu_a10g"]["resources"]["GPU"] = 0.5
    too_many_min = load(CLUSTER_YAML)
    too_many_min["available_node_types"]["gpu_a10g"]["min_workers"] = too_many_min["max_workers"] + 1
    for broken in (fractional_gpu, too_many_min):
        with pytest.raises(Exception):
            validate_config(prepare_config(broken))


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_user_and_install():
    instructions = dockerfile_instructions((INFRA / "Dockerfile").read_text())
    base = resolve_from(instructions)
    v = build_script_vars()
    assert base == f"rayproject/ray:{pin('ray')}-{v['PYTHON_TAG']}-{v['CUDA_TAG']}"
    assert re.search(r"-cu\d{3}$", base), "a CUDA base image"
    users = [rest for instr, rest in instructions if instr == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(instr == "WORKDIR" for instr, _ in instructions)
    copies = " ".join(rest for instr, rest in instructions if instr == "COPY")
    assert "constraints.txt" in copies
    runs = [rest for instr, rest in instructions if instr == "RUN"]
    assert any("pip install" in r and "-c constraints.txt" in r and re.search(r"\s\.(\s|$)", r) for r in runs)
    assert not any(instr in ("ENTRYPOINT", "CMD") for instr, _ in instructions)


def test_dockerignore_keeps_local_state_out():
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for pattern in ("**/.venv", "**/.git", "**/.env", "mlflow.db"):
        assert pattern in ignored


# ----------------------------------------------------------------------------- KubeRay
def test_kuberay_images_versions_and_gpus():
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == pin("ray"), name
        images = list(walk(spec, "image"))
        assert images and set(images) == {expected_image()}, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        [gpu] = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"], name
        [container] = gpu["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"]), name


def test_kuberay_credentials_are_secret_references():
    secret = load(KUBERAY / "secrets.example.yaml")
    config_map = load(KUBERAY / "config.yaml")
    assert secret["kind"] == "Secret" and config_map["kind"] == "ConfigMap"
    assert "MLFLOW_TRACKING_URI" in config_map["data"]
    for name, spec in cluster_specs().items():
        containers = list(walk(spec, "containers"))
        assert len(containers) == 2, name  # head + gpu group
        for [container] in containers:
            env = {e["name"]: e for e in container["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert "value" not in env[key], f"{name}: {key} must not be a literal"
                assert ref == {"name": secret["metadata"]["name"], "key": key}, name
                assert key in secret["stringData"]
            assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in container["envFrom"], name


def test_kuberay_specs_agree():
    """The RayJob's cluster is the long-lived RayCluster, up to replica counts and autoscaler idling."""
    a, b = cluster_specs().values()
    for spec in (a, b):
        spec.pop("autoscalerOptions")
        for group in spec["workerGroupSpecs"]:
            group.pop("replicas")
    assert a == b


def test_rayjob_lifecycle_and_runtime_env():
    spec = load(KUBERAY / "rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/crossdim"  # WORKDIR of infra/Dockerfile
    assert "WORKDIR /home/ray/crossdim" in (INFRA / "Dockerfile").read_text()


def rayjob_entrypoint() -> tuple[str, str, list[str]]:
    argv = shlex.split(load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return argv[2], config, overrides


def test_rayjob_entrypoint_module_and_overrides():
    from crossdim.config import TrainConfig, load_config

    module, _config, overrides = rayjob_entrypoint()
    assert module == "pipelines.train"
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    config = load_config(TrainConfig, None, overrides)  # every --set names a real field
    assert config.storage_path.startswith("s3://")
    assert config.scaling.use_gpu is True


def test_rayjob_config_file_exists():
    _module, config, _overrides = rayjob_entrypoint()
    if not (ROOT / config).is_file():
        pytest.skip(f"{config} is written by another part of the project and is not there yet")
    from crossdim.config import TrainConfig, load_config

    load_config(TrainConfig, ROOT / config, rayjob_entrypoint()[2])


# ----------------------------------------------------------------------------- local stack
def test_local_stack_services_and_wiring():
    compose = load(STACK / "docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    base = resolve_from(dockerfile_instructions((STACK / "mlflow.Dockerfile").read_text()))
    assert base == f"ghcr.io/mlflow/mlflow:v{pin('mlflow')}"


def test_local_stack_env_example_covers_required_variables():
    text = (STACK / "docker-compose.yaml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(line.split("=", 1) for line in (STACK / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required and required <= set(example)
    assert all("change-me" in example[k] for k in required if "PASSWORD" in k)
    assert ".env" in (STACK / ".gitignore").read_text().split()


def test_readme_explains_the_environment_contract():
    text = (INFRA / "README.md").read_text()
    for needle in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "RAY_ADDRESS",
                   "crossdim doctor", "ray_cluster.yaml", "rayjob.yaml", "docker compose"):
        assert needle in text, needle
