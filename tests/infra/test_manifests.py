"""The deployment files in infra/ stay true to the code.

Every YAML file parses; Kubernetes and KubeRay manifests validate, offline, against a vendored schema of the
fields they use (unknown fields fail); Ray cluster-launcher configs validate against the schema Ray ships and
Ray's own config checks; every `jobs/*.py` command line in a manifest, the DAG, the Dockerfile or
README.md parses with that script's `build_parser()`; the Dockerfile installs what pyproject.toml
declares; the manifests agree with each other (cluster spec, images, Ray version, schedule).
"""

from __future__ import annotations

import argparse
import ast
import copy
import email.parser
import importlib.util
import io
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
RAY_CONFIGS = INFRA / "ray"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"
DAG = INFRA / "airflow" / "lakesum_nightly.py"
DEPLOYING = INFRA.parent / "README.md"  # its Deploying section
SCHEMA = Path(__file__).resolve().parent / "schemas" / "kubernetes-1.34-kuberay-1.6.subset.json"

YAML_FILES = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))

# RaySubmitJobOperator.__init__ in apache-airflow-providers-google 22.8.0
# (airflow/providers/google/cloud/operators/ray.py, with RayJobBaseOperator's gcp_conn_id and impersonation_chain).
RAY_SUBMIT_JOB_PARAMS = {
    "cluster_address",
    "entrypoint",
    "get_job_logs",
    "wait_for_job_done",
    "runtime_env",
    "metadata",
    "submission_id",
    "entrypoint_num_cpus",
    "entrypoint_num_gpus",
    "entrypoint_memory",
    "entrypoint_resources",
    "submit_job_timeout",
    "gcp_conn_id",
    "impersonation_chain",
}
RAY_SUBMIT_JOB_REQUIRED = {"cluster_address", "entrypoint"}
# The BaseOperator arguments the DAG may pass along with them.
BASE_OPERATOR_PARAMS = {
    "task_id",
    "retries",
    "retry_delay",
    "execution_timeout",
    "pool",
    "queue",
    "priority_weight",
    "trigger_rule",
    "depends_on_past",
    "owner",
    "doc_md",
    "email_on_failure",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@cache
def _documents(path: Path) -> tuple:
    with open(path) as f:
        return tuple(doc for doc in yaml.safe_load_all(f) if doc is not None)


def _kube_objects() -> list[tuple[str, dict]]:
    """Every Kubernetes object in infra/kuberay, and every manifest embedded in a ConfigMap (e.g. the RayJob
    that the CronJob creates), each with a name for messages."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _documents(path):
            where = f"{_rel(path)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            found.append((where, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for inner in yaml.safe_load_all(text):
                            if inner is not None:
                                found.append((f"{where}[{key}]", inner))
    return found


def _by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, obj) for where, obj in _kube_objects() if obj.get("kind") == kind]


def _rayjob_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec: RayJobs themselves and RayCronJobs' job templates."""
    specs = [(where, obj["spec"]) for where, obj in _by_kind("RayJob")]
    specs += [(where, obj["spec"]["jobTemplate"]) for where, obj in _by_kind("RayCronJob")]
    return specs


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(where, obj["spec"]) for where, obj in _by_kind("RayCluster")]
    specs += [(where, spec["rayClusterSpec"]) for where, spec in _rayjob_specs() if "rayClusterSpec" in spec]
    return specs


def _pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster_spec.get("workerGroupSpecs", [])
    ]


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        op, _, args = pending.strip().partition(" ")
        instructions.append((op.upper(), args.strip()))
        pending = ""
    return instructions


def _docker_args() -> dict[str, str]:
    """ARG defaults, wherever they are declared."""
    args = {}
    for op, rest in _dockerfile():
        if op == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs, in order, ARGs expanded."""
    args, installs = _docker_args(), []
    for op, rest in _dockerfile():
        if op != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(_expand(command, args))
            while words and words[0] in ("python", "python3", "-m"):
                words = words[1:]
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def _workdir() -> str:
    return [rest for op, rest in _dockerfile() if op == "WORKDIR"][-1]


def test_dockerfile_base_is_a_pinned_cuda_image_and_it_runs_as_a_user():
    froms = [_expand(rest, _docker_args()) for op, rest in _dockerfile() if op == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    name, _, tag = image.rpartition(":")
    assert name == "nvidia/cuda" and tag and tag != "latest", f"base image {image}: pin a CUDA image by tag"
    users = [rest for op, rest in _dockerfile() if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert _workdir().startswith("/home/"), _workdir()


def test_dockerfile_installs_the_makefiles_torch_first_then_the_project_as_pyproject_declares():
    installs = _pip_installs()
    requirements = _requirements()
    torch_spec = _docker_args()["TORCH_SPEC"]
    makefile_spec = re.search(r"^TORCH_SPEC \?= (\S+)", (REPO / "Makefile").read_text(), re.M)[1]
    assert torch_spec == makefile_spec, f"Dockerfile TORCH_SPEC {torch_spec} != Makefile TORCH_SPEC {makefile_spec}"
    torch_pin = Requirement(torch_spec)
    pinned = next(iter(torch_pin.specifier)).version
    assert requirements["torch"].specifier.contains(pinned), (
        f"{torch_spec} does not satisfy pyproject's {requirements['torch']}"
    )

    torch_at = [i for i, words in enumerate(installs) if torch_spec in words]
    project_at = [i for i, words in enumerate(installs) if "." in words]
    assert len(torch_at) == 1 and len(project_at) == 1, installs
    assert torch_at[0] < project_at[0], "torch must be installed before the project (as in the Makefile)"

    project = installs[project_at[0]]
    for forbidden in ("-e", "--editable", "--no-deps", "-r", "--requirement", "-c", "--constraint"):
        assert forbidden not in project, (
            f"`pip install {' '.join(project)}`: {forbidden} bypasses pyproject's dependencies"
        )
    # Anything named beside the project must be one of its dependencies, pinned within pyproject's range.
    for word in project:
        if word == "." or word.startswith("-"):
            continue
        req = Requirement(word)
        declared = requirements.get(canonicalize_name(req.name))
        assert declared is not None, f"the Dockerfile installs {word}, which pyproject.toml does not declare"
        assert req.extras <= declared.extras, f"{word}: extras beyond pyproject's {declared}"
        for spec in req.specifier:
            assert declared.specifier.contains(spec.version), f"{word} is outside pyproject's {declared}"
    # Every other pip install is torch or pip itself.
    for i, words in enumerate(installs):
        if i not in torch_at + project_at:
            assert [w for w in words if not w.startswith("-")] == ["pip"], f"unexpected `pip install {' '.join(words)}`"


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_build_context_builds_a_wheel_with_pyprojects_dependencies(tmp_path):
    """Run the image's `pip install .` step on the files the Dockerfile copies (through its .dockerignore):
    the wheel it builds requires exactly pyproject's dependencies and holds every module of its packages."""
    workdir = _workdir()
    context = tmp_path / "context"
    instructions = _dockerfile()
    project_install = next(i for i, (op, rest) in enumerate(instructions) if op == "RUN" and "pip install ." in rest)
    copied = []
    for i, (op, rest) in enumerate(instructions):
        if op != "COPY":
            continue
        assert not any(w.startswith("--from") for w in rest.split()), f"COPY {rest}: from another stage"
        words = [w for w in rest.split() if not w.startswith("--")]
        *sources, dest = words
        for source in sources:
            src = REPO / source
            assert src.exists(), f"COPY {source}: not in the repository"
            assert not _dockerignore_excludes(source.rstrip("/")), f"COPY {source}: excluded by {_rel(DOCKERIGNORE)}"
            files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                if _dockerignore_excludes(rel):
                    continue
                target = dest if dest.startswith("/") else f"{workdir}/{dest}"
                target = posixpath.normpath(target + "/" + (f.name if src.is_file() else f.relative_to(src).as_posix()))
                if i < project_install:
                    assert target.startswith(workdir + "/"), target
                    out = context / target[len(workdir) + 1 :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
                copied.append(rel)
    for package in _pyproject()["tool"]["setuptools"]["packages"]:
        assert any(rel.startswith(package + "/") for rel in copied), f"package {package}/ is not copied into the image"

    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(context),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        metadata_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(z.read(metadata_name).decode())
        names = set(z.namelist())
    required = {str(Requirement(r)) for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r}
    declared = {str(r) for r in _requirements().values()}
    assert required == declared, f"the image would install {sorted(required)}, pyproject declares {sorted(declared)}"
    for package in _pyproject()["tool"]["setuptools"]["packages"]:
        for module in (REPO / package).glob("*.py"):
            assert f"{package}/{module.name}" in names, f"{package}/{module.name} is missing from the image's install"


def test_dockerignore_keeps_local_state_out_of_the_image():
    for path in (
        ".venv/bin/python",
        "demo_out/corpus/a.parquet",
        ".git/HEAD",
        "model/__pycache__/mt5.cpython-311.pyc",
        "benchmarks/.cache/x.safetensors",
        "tests/conftest.py",
    ):
        assert _dockerignore_excludes(path), f"{path} would be sent into the image's build context"
    for path in ("pyproject.toml", "README.md", "model/mt5.py", "pipeline/driver.py", "jobs/summarize.py"):
        assert not _dockerignore_excludes(path), path


# ----------------------------------------------------------------------------------------------------------------
# YAML and schemas


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_file_parses(path):
    docs = _documents(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


@cache
def _schema() -> dict:
    return json.loads(SCHEMA.read_text())


def _validator(obj: dict) -> jsonschema.Draft202012Validator:
    schema = _schema()
    key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
    assert key in schema["kinds"], f"{key}: not in {SCHEMA.name}; add its schema from upstream"
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], **schema["kinds"][key]})


def _schema_errors(obj: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(_validator(obj).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("where,obj", _kube_objects(), ids=[w for w, _ in _kube_objects()])
def test_kubernetes_manifests_validate_against_the_vendored_schema(where, obj):
    errors = _schema_errors(obj)
    assert not errors, f"{where}:\n  " + "\n  ".join(errors)


def test_vendored_schema_rejects_unknown_and_misplaced_fields():
    rayjob = _by_kind("RayJob")[0][1]
    misspelt = copy.deepcopy(rayjob)
    misspelt["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in _schema_errors(misspelt))
    misplaced = copy.deepcopy(rayjob)
    worker = misplaced["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["gpus"] = 1
    assert _schema_errors(misplaced)
    bad_quantity = copy.deepcopy(rayjob)
    bad_quantity["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ] = "8 GB"
    assert _schema_errors(bad_quantity)
    numeric_param = copy.deepcopy(rayjob)
    numeric_param["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert _schema_errors(numeric_param)


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted(RAY_CONFIGS.glob("*.yaml")), ids=_rel)
def test_ray_cluster_configs_pass_rays_schema_and_config_checks(path):
    """What `ray up` checks before it talks to the cloud: Ray's bundled schema, then its defaults and checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _documents(path)
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", sorted(RAY_CONFIGS.glob("*.yaml")), ids=_rel)
def test_ray_cluster_configs_run_the_image_with_a_cpu_head_and_gpu_workers(path):
    (config,) = _documents(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "replicas must not land on the head"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU") == 1 for t in workers), "one GPU per worker: one replica each"
    assert all(1 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert config["docker"]["image"] == _lakesum_image()
    workdir = _workdir()
    assert config["file_mounts"] == {workdir: "."}, "the checkout goes to the image's working directory"
    assert f"pip install --quiet {workdir}" in config["setup_commands"], "every node installs the synced checkout"


def test_ray_schema_check_is_strict():
    (config,) = _documents(sorted(RAY_CONFIGS.glob("*.yaml"))[0])
    broken = copy.deepcopy(config)
    broken["docker"]["imagee"] = broken["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


# ----------------------------------------------------------------------------------------------------------------
# The manifests agree with each other and do what the issue asks


def _lakesum_image() -> str:
    """The image of the RayCluster's head: the one every Ray node must run."""
    ((_, cluster),) = _by_kind("RayCluster")
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_every_node_runs_the_same_lakesum_image_tagged_with_the_project_version():
    name, _, tag = _lakesum_image().rpartition(":")
    assert name.rpartition("/")[2] == "lakesum" and tag == _pyproject()["project"]["version"], _lakesum_image()
    images = {}
    for where, spec in _cluster_specs():
        for template in _pod_templates(spec):
            for container in template["spec"]["containers"]:
                images[f"{where}:{container['name']}"] = container["image"]
    for path in sorted(RAY_CONFIGS.glob("*.yaml")):
        images[_rel(path)] = _documents(path)[0]["docker"]["image"]
    assert set(images.values()) == {_lakesum_image()}, images


def test_kuberay_ray_version_is_the_images_ray():
    ray_version = _docker_args()["RAY_VERSION"]
    assert _requirements()["ray"].specifier.contains(ray_version)
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray_version, (
            f"{where}: rayVersion {spec['rayVersion']} != image's Ray {ray_version}"
        )


def test_every_ray_cluster_spec_is_the_raycluster_manifests():
    (reference_where, reference), *others = _cluster_specs()
    assert others, "RayJob, RayCronJob and the CronJob's RayJob each create a cluster"
    for where, spec in others:
        assert spec == reference, f"{where}: its rayClusterSpec differs from {reference_where}'s spec"


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_kuberay_clusters_have_a_cpu_head_and_one_gpu_per_worker(where, spec):
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "replicas must not land on the head"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    groups = spec.get("workerGroupSpecs", [])
    assert groups
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == 1, f"{group['groupName']}: one GPU each"
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


@pytest.mark.parametrize("where,spec", _rayjob_specs(), ids=[w for w, _ in _rayjob_specs()])
def test_rayjobs_submit_a_job_and_clean_up_after_it(where, spec):
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert re.search(r"\bjobs/\w+\.py\b", spec["entrypoint"])
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    _, argv = _job_argv(spec["entrypoint"])
    replicas = int(argv[argv.index("--replicas") + 1]) if "--replicas" in argv else 1
    assert replicas <= sum(g["replicas"] for g in workers), f"{where}: --replicas {replicas} exceeds the GPU workers"


def _cron_of_dag() -> str:
    tree = ast.parse(DAG.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "CronDataIntervalTimetable":
            return node.args[0].value
    raise AssertionError(f"{_rel(DAG)}: no CronDataIntervalTimetable schedule")


def test_nightly_schedules_agree():
    ((_, raycron),) = _by_kind("RayCronJob")
    ((_, cronjob),) = _by_kind("CronJob")
    schedules = {
        "RayCronJob": raycron["spec"]["schedule"],
        "CronJob": cronjob["spec"]["schedule"],
        "DAG": _cron_of_dag(),
    }
    assert len(set(schedules.values())) == 1, schedules
    assert re.fullmatch(r"(\S+\s+){4}\S+", raycron["spec"]["schedule"]), "a five-field cron expression"
    assert cronjob["spec"]["timeZone"] == "Etc/UTC"
    for where, spec in _rayjob_specs():
        if "nightly" in where or "RayCronJob" in where:
            assert "--partition-filter" in spec["entrypoint"], f"{where}: a nightly run selects its partition"


def test_cronjob_creates_a_uniquely_named_rayjob_with_just_enough_rbac():
    ((_, cronjob),) = _by_kind("CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("registry.k8s.io/kubectl:v")
    command = container.get("command", []) + container.get("args", [])
    assert command[:3] == ["kubectl", "create", "-f"], "`kubectl create` honours generateName; `apply` does not"
    manifest_path = Path(command[3])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == manifest_path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    ((config_where, configmap),) = [
        (w, o) for w, o in _by_kind("ConfigMap") if o["metadata"]["name"] == volume["configMap"]["name"]
    ]
    embedded = yaml.safe_load(configmap["data"][manifest_path.name])
    assert embedded["kind"] == "RayJob"
    assert "generateName" in embedded["metadata"] and "name" not in embedded["metadata"], "each night a new name"

    ((_, account),) = _by_kind("ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    ((_, role),) = _by_kind("Role")
    ((_, binding),) = _by_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    assert any(
        "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
        for rule in role["rules"]
    )
    assert all(rule["verbs"] == ["create"] for rule in role["rules"]), "nothing beyond creating RayJobs"


# ----------------------------------------------------------------------------------------------------------------
# jobs/*.py command lines


_JOB = re.compile(r"(?:[\w./-]*/)?jobs/(\w+)\.py")


def _neutralize(text: str) -> str:
    """Templates and shell substitutions become plain words, so that shlex can split what remains."""
    text = re.sub(r"\{\{.*?\}\}", "X", text)
    text = re.sub(r"\$\([^()]*\)", "X", text)
    return re.sub(r"\$\{\w+\}|\$\w+", "X", text)


def _job_argv(command: str) -> tuple[str, list[str]]:
    """The script named in a command line, and its arguments up to the end of that shell command."""
    text = _neutralize(command.replace("\\\n", " "))
    match = _JOB.search(text)
    line = text[match.end() :].split("\n", 1)[0]
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    argv = []
    for token in lexer:  # quotes respected; an unquoted ; && || | > & ) or # ends the command
        if token and token[0] in ";&|<>()":
            break
        argv.append(token)
    return match[1], argv


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        if value and all(isinstance(v, str) for v in value) and any(_JOB.search(v) for v in value):
            yield shlex.join(value)  # an exec-form command: ["python", "jobs/summarize.py", "--flag", ...]
        else:
            for v in value:
                yield from _strings(v)


def _command_lines() -> list[tuple[str, str]]:
    """(where, command line) for every jobs/*.py invocation in infra/: manifests (embedded ones too), the
    cluster-launcher configs, the Dockerfile, the Airflow DAG's strings and the README's Deploying section's shell
    blocks."""
    found = []
    for path in YAML_FILES:
        for doc in _documents(path):
            if doc.get("kind") == "ConfigMap":  # embedded manifests: read as objects below, not as YAML text
                doc = {
                    **doc,
                    "data": {k: v for k, v in (doc.get("data") or {}).items() if not k.endswith((".yaml", ".yml"))},
                }
            for text in _strings(doc):
                found += [(_rel(path), m) for m in _commands_in(text)]
    for where, obj in _kube_objects():
        if "[" in where:  # embedded manifests were only strings above
            for text in _strings(obj):
                found += [(where, m) for m in _commands_in(text)]
    for op, rest in _dockerfile():
        if op in ("RUN", "CMD", "ENTRYPOINT"):
            text = shlex.join(json.loads(rest)) if rest.startswith("[") else rest
            found += [(_rel(DOCKERFILE), m) for m in _commands_in(text)]
    for node in ast.walk(ast.parse(DAG.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(_rel(DAG), m) for m in _commands_in(node.value)]
    if DEPLOYING.exists():
        deploying = DEPLOYING.read_text().split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", deploying, re.S):
            found += [(_rel(DEPLOYING), m) for m in _commands_in(block)]
    return found


def _commands_in(text: str) -> list[str]:
    """Each jobs/*.py invocation in a text, from its script to the end of its (continued) shell line."""
    text = text.replace("\\\n", " ")
    return [
        text[m.start() :]
        for m in _JOB.finditer(text)
        if not text[m.end() : m.end() + 1].isalnum() and not re.match(r"\s*[,:)]", text[m.end() :])
    ]


@cache
def _parser(script: str, source: Path | None = None) -> argparse.ArgumentParser:
    path = source or REPO / "jobs" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_infra_check_{script}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _flag_problems(command: str, parser: argparse.ArgumentParser) -> list[str]:
    script, argv = _job_argv(command)
    known = {s for action in parser._actions for s in action.option_strings}
    problems = [
        f"jobs/{script}.py has no flag {word.split('=')[0]}"
        for word in argv
        if word.startswith("--") and word.split("=")[0] not in known
    ]
    if not problems:
        stderr = io.StringIO()
        try:
            with redirect_stderr(stderr):
                parser.parse_args(argv)
        except SystemExit as exit:
            if exit.code not in (0, None):  # --help exits 0
                problems.append(
                    f"jobs/{script}.py rejects {shlex.join(argv)}: {stderr.getvalue().strip().splitlines()[-1]}"
                )
    return problems


def test_command_lines_are_found_everywhere_the_jobs_are_run():
    where = {w.split(":")[0].split("[")[0] for w, _ in _command_lines()}
    for expected in (
        "infra/kuberay/rayjob.yaml",
        "infra/kuberay/raycronjob.yaml",
        "infra/kuberay/cronjob-rayjob.yaml",
        _rel(DAG),
        _rel(DEPLOYING),
    ):
        assert expected in where, f"no jobs/*.py command line found in {expected}: the flag check would miss it"


@pytest.mark.parametrize(
    "where,command", _command_lines(), ids=[f"{w}#{i}" for i, (w, _) in enumerate(_command_lines())]
)
def test_every_job_flag_used_in_infra_exists_in_the_jobs_parser(where, command):
    script, _ = _job_argv(command)
    assert (REPO / "jobs" / f"{script}.py").exists(), f"{where}: jobs/{script}.py does not exist"
    problems = _flag_problems(command, _parser(script))
    assert not problems, f"{where}: {command.splitlines()[0][:200]}\n  " + "\n  ".join(problems)
    path = _JOB.search(_neutralize(command))[0]
    if path.startswith("/"):
        assert path == f"{_workdir()}/jobs/{script}.py", f"{where}: {path} is not where the image puts the job"


def test_flag_check_fails_when_a_job_renames_a_flag(tmp_path):
    """The check above, against a copy of jobs/summarize.py whose --partition-filter became --partitions."""
    source = (REPO / "jobs" / "summarize.py").read_text()
    assert '"--partition-filter"' in source
    renamed = tmp_path / "summarize.py"
    renamed.write_text(source.replace('"--partition-filter"', '"--partitions", dest="partition_filter"'))
    parser = _parser("summarize", renamed)
    nightly = [c for w, c in _command_lines() if "--partition-filter" in c]
    assert nightly
    for command in nightly:
        assert any("no flag --partition-filter" in p for p in _flag_problems(command, parser))


# ----------------------------------------------------------------------------------------------------------------
# Airflow


def _operator_call() -> ast.Call:
    tree = ast.parse(DAG.read_text())
    imports = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imports.get("RaySubmitJobOperator") == "airflow.providers.google.cloud.operators.ray"
    (call,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "RaySubmitJobOperator"
    ]
    return call


def test_airflow_dag_submits_the_job_with_the_ray_providers_operator():
    call = _operator_call()
    keywords = {k.arg: k.value for k in call.keywords}
    unknown = set(keywords) - RAY_SUBMIT_JOB_PARAMS - BASE_OPERATOR_PARAMS
    assert not unknown, f"RaySubmitJobOperator has no parameter {sorted(unknown)}"
    assert RAY_SUBMIT_JOB_REQUIRED | {"task_id"} <= set(keywords)
    assert ast.literal_eval(keywords["wait_for_job_done"]) is True
    entrypoint = ast.literal_eval(keywords["entrypoint"])
    assert "{{ ds }}" in entrypoint, "the partition is the run's data interval"
    assert "{{" in ast.literal_eval(keywords["submission_id"]), "a submission id per run and try"


def test_airflow_dag_loads_with_the_real_provider():
    """Where Airflow and the Google provider are installed: the operator takes these arguments and the DAG loads."""
    pytest.importorskip("airflow.providers.google.cloud.operators.ray")
    import inspect

    from airflow.providers.google.cloud.operators.ray import RaySubmitJobOperator

    params = set(inspect.signature(RaySubmitJobOperator.__init__).parameters) | {"gcp_conn_id", "impersonation_chain"}
    assert RAY_SUBMIT_JOB_PARAMS <= params
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["lakesum_nightly"]
    assert dag.get_task("summarize").entrypoint == ast.literal_eval(
        {k.arg: k.value for k in _operator_call().keywords}["entrypoint"]
    )
