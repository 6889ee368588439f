"""infra/ as a team applies it, checked without a network or a cluster.

The KubeRay manifests against the RayCluster and RayJob CRDs of KubeRay v1.7.0 (vendored in
tests/data/kuberay/) and the rules its operator enforces beyond them; the cluster launcher's YAML
with Ray's own config validation; the compose file against the README that drives it; one Ray,
Python, torch and MLflow version across infra/, pyproject.toml and the Makefile; no credential
written anywhere in infra/. Every check also runs on a copy broken on purpose (in tmp_path) and
must refuse it, so none of them passes by checking nothing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "data" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERAY_MANIFESTS = sorted(p.name for p in (ROOT / "infra" / "kuberay").glob("*.yaml"))
RAYJOBS = [name for name in KUBERAY_MANIFESTS if name.startswith("rayjob-")]

# The Secrets every Ray container reads its object-store and MLflow settings from (envFrom).
SETTINGS_SECRETS = ("mltr-s3", "mltr-mlflow")
# Variables that hold a credential: in a manifest only ever from a Secret, never a literal value.
CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN",
}  # fmt: skip


def load(path: Path) -> dict:
    # libyaml's loader where PyYAML has it: the CRDs are 2.3 MB of YAML.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def tree_copy(tmp_path: Path) -> Path:
    """infra/ with pyproject.toml and the Makefile, copied to be edited."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "infra", root / "infra", ignore=shutil.ignore_patterns(".env"))
    for name in ("pyproject.toml", "Makefile"):
        shutil.copy(ROOT / name, root / name)
    return root


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}: the break would break nothing"
    path.write_text(text.replace(old, new, 1))


def edited_copy(tmp_path: Path, source: Path, edit: Callable[[dict], None]) -> Path:
    """``source`` loaded, edited and written to tmp_path: the file a careless edit would leave."""
    doc = load(source)
    edit(doc)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --- KubeRay: the CRD schema ------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The schema with every declared object closed to undeclared fields.

    JSON Schema lets an object carry fields it does not declare; the Kubernetes API server drops
    them from a structural schema, and kubectl (``--validate=strict``, its default) refuses them:
    a misspelt field would otherwise pass and be silently ignored.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


# The API server checks integer ranges by format; int-or-string quantities are an anyOf of both
# types with a pattern (which JSON Schema applies to the string form), so they are checked too.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = load(CRDS / CRD_FILES[kind])
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=FORMATS)


def schema_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return [f"kind {kind!r} is none of {', '.join(CRD_FILES)}"]
    errors = crd_validator(kind).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --- KubeRay: what the operator refuses beyond the schema (KubeRay v1.7.0, utils/validation.go) --

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # a RayJob's cluster is named after it, plus a suffix
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
RAY_START_RESOURCES = {"num-cpus", "num-gpus", "memory", "resources"}  # not beside a group's resources


def cluster_spec(doc: dict) -> dict:
    """A RayCluster's spec, or the cluster a RayJob embeds."""
    spec = doc.get("spec") or {}
    return (spec.get("rayClusterSpec") or {}) if doc.get("kind") == "RayJob" else spec


def groups(cluster: dict) -> Iterator[tuple[str, dict]]:
    """(name, group) of the head and every worker group."""
    yield "head", cluster.get("headGroupSpec") or {}
    for group in cluster.get("workerGroupSpecs") or []:
        yield str(group.get("groupName")), group


def operator_problems(doc: dict) -> list[str]:
    problems = []
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/v1")
    name = str((doc.get("metadata") or {}).get("name") or "")
    if not DNS1035.fullmatch(name) or len(name) > MAX_NAME.get(kind, 0):
        problems.append(
            f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME.get(kind)} characters"
        )
    if kind == "RayJob":
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            problems.append("a RayJob needs exactly one of rayClusterSpec and clusterSelector")
        if spec.get("clusterSelector") and spec.get("backoffLimit", 0) > 0:
            problems.append("backoffLimit is refused with clusterSelector")
        if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished acts only with shutdownAfterJobFinishes: true")
        # The CRD does not enumerate the modes (rayjob_types.go does); an unknown one is not refused
        # but leaves the RayJob in no mode the controller handles.
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(
                f"submissionMode {spec['submissionMode']!r} is none of {', '.join(SUBMISSION_MODES)}"
            )
        if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            problems.append("runtimeEnvYAML is not a YAML mapping")
    cluster = cluster_spec(doc)
    autoscaler_v2 = (
        cluster.get("enableInTreeAutoscaling")
        and (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    )
    names = [name for name, _ in groups(cluster)]
    if len(set(names)) != len(names):
        problems.append(f"group names repeat: {names}")
    for name, group in groups(cluster):
        pod = (group.get("template") or {}).get("spec") or {}
        if not pod.get("containers"):
            problems.append(f"group {name}: no container")
        if autoscaler_v2 and pod.get("restartPolicy", "Never") != "Never":
            problems.append(f"group {name}: restartPolicy must be Never or unset with autoscaler v2")
        if group.get("resources") and RAY_START_RESOURCES & set(group.get("rayStartParams") or {}):
            problems.append(f"group {name}: resources in both rayStartParams and resources")
        if name != "head":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            if not 0 <= low <= group.get("replicas", low) <= high:
                problems.append(f"group {name}: needs 0 <= minReplicas <= replicas <= maxReplicas")
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token" and Version(str(cluster.get("rayVersion") or "0")) < Version("2.52.0"):
        problems.append("authOptions.mode token needs rayVersion 2.52.0 or later")
    return problems


# --- KubeRay: what mltr needs of its clusters -----------------------------------------------


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, container) of every container the manifest defines, the autoscaler's settings too."""
    cluster = cluster_spec(doc)
    for name, group in groups(cluster):
        for container in ((group.get("template") or {}).get("spec") or {}).get("containers") or []:
            yield f"group {name}", container
    if cluster.get("autoscalerOptions"):
        yield "autoscalerOptions", cluster["autoscalerOptions"]
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate") if doc.get("kind") == "RayJob" else None
    for container in ((submitter or {}).get("spec") or {}).get("containers") or []:
        yield "submitter", container


def gpus(group: dict) -> int:
    pod = (group.get("template") or {}).get("spec") or {}
    return sum(
        int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in pod.get("containers") or []
    )


def mltr_problems(doc: dict) -> list[str]:
    problems = []
    cluster = cluster_spec(doc)
    head = cluster.get("headGroupSpec") or {}
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        problems.append('head rayStartParams must have num-cpus: "0" (no work on the head)')
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    workers = dict(list(groups(cluster))[1:])
    gpu_groups = [name for name, group in workers.items() if gpus(group) > 0]
    if not gpu_groups:
        problems.append("no worker group with nvidia.com/gpu limits")
    if not [name for name, group in workers.items() if gpus(group) == 0]:
        problems.append("no CPU-only worker group for Ray Data")
    if doc.get("kind") == "RayCluster":
        problems += [
            f"group {n}: minReplicas must be 0" for n in gpu_groups if workers[n].get("minReplicas") != 0
        ]
    for where, container in containers(doc):
        if where.startswith("group "):
            refs = {(item.get("secretRef") or {}).get("name") for item in container.get("envFrom") or []}
            problems += [f"{where}: envFrom lacks secretRef {s}" for s in SETTINGS_SECRETS if s not in refs]
        for env in container.get("env") or []:
            from_secret = "secretKeyRef" in (env.get("valueFrom") or {})
            if env.get("name") in CREDENTIAL_ENV and ("value" in env or not from_secret):
                problems.append(f"{where}: {env['name']} must come from a secretKeyRef, not a value")
    return problems


# --- KubeRay: one node-type set in raycluster.yaml and every RayJob ------------------------------


def cluster_shape(cluster: dict) -> dict:
    """What makes the cluster's node types: everything but how many pods a job starts with and
    the volumes it mounts."""
    shape = {k: v for k, v in cluster.items() if k not in ("headGroupSpec", "workerGroupSpecs")}
    for name, group in groups(cluster):
        group = copy.deepcopy({k: v for k, v in group.items() if k not in ("replicas", "minReplicas")})
        pod = group.get("template", {}).get("spec", {})
        pod.pop("volumes", None)
        for container in pod.get("containers", []):
            container.pop("volumeMounts", None)
        shape[f"group {name}"] = group
    return shape


def shape_differences(rayjob: dict, raycluster: dict) -> list[str]:
    job, shared = cluster_shape(cluster_spec(rayjob)), cluster_shape(cluster_spec(raycluster))
    return [key for key in sorted(set(job) | set(shared)) if job.get(key) != shared.get(key)]


# --- Tests: KubeRay ---------------------------------------------------------------------------


def test_vendored_crds_are_kuberay_v1_7_0_unmodified():
    note = (CRDS / "README.md").read_text()
    assert "v1.7.0" in note and "Apache License, Version 2.0" in note
    for name in CRD_FILES.values():
        digest = hashlib.sha256((CRDS / name).read_bytes()).hexdigest()
        assert f"| `{name}` | `{digest}` |" in note, f"{name} differs from the copy its note records"


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_validates_against_kuberay_crd(name):
    assert schema_errors(load(ROOT / "infra" / "kuberay" / name)) == []


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_passes_the_operators_own_checks(name):
    assert operator_problems(load(ROOT / "infra" / "kuberay" / name)) == []


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_manifest_has_mltr_node_types_and_secrets(name):
    assert mltr_problems(load(ROOT / "infra" / "kuberay" / name)) == []


def _worker(doc: dict, name: str) -> dict:
    return next(g for g in cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == name)


def _head_container(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


SCHEMA_BREAKS = {
    "rayVersion-not-a-string": (
        "raycluster.yaml",
        lambda d: d["spec"].update(rayVersion=2),
        "spec.rayVersion",
    ),
    "worker-group-without-groupName": (
        "raycluster.yaml",
        lambda d: _worker(d, "gpu").pop("groupName"),
        "'groupName' is a required property",
    ),
    "misspelt-field": (
        "raycluster.yaml",
        lambda d: d["spec"].update(authOption=d["spec"].pop("authOptions")),
        "'authOption' was unexpected",
    ),
    "auth-mode-not-in-enum": (
        "raycluster.yaml",
        lambda d: d["spec"]["authOptions"].update(mode="tokens"),
        "spec.authOptions.mode",
    ),
    "quantity-not-a-quantity": (
        "raycluster.yaml",
        lambda d: _head_container(d)["resources"]["limits"].update(memory="32GB"),
        "limits.memory",
    ),
    "replicas-beyond-int32": (
        "raycluster.yaml",
        lambda d: _worker(d, "cpu").update(maxReplicas=2**40),
        "maxReplicas: 1099511627776 is not a 'int32'",
    ),
    "backoffLimit-not-an-integer": (
        "rayjob-train.yaml",
        lambda d: d["spec"].update(backoffLimit="1"),
        "spec.backoffLimit",
    ),
    "env-from-secret-misspelt": (
        "rayjob-train.yaml",
        lambda d: _head_container(d)["envFrom"][0].update(secretRefs={"name": "x"}),
        "'secretRefs' was unexpected",
    ),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS)
def test_crd_validation_refuses_a_broken_copy(case, tmp_path):
    name, edit, expected = SCHEMA_BREAKS[case]
    errors = schema_errors(load(edited_copy(tmp_path, ROOT / "infra" / "kuberay" / name, edit)))
    assert any(expected in e for e in errors), errors


OPERATOR_BREAKS = {
    "name-not-dns-1035": (
        "raycluster.yaml",
        lambda d: d["metadata"].update(name="MLTR_cluster"),
        "metadata.name",
    ),
    "rayjob-name-too-long": (
        "rayjob-tune.yaml",
        lambda d: d["metadata"].update(name="m" * 48),
        "metadata.name",
    ),
    "min-above-max": ("raycluster.yaml", lambda d: _worker(d, "gpu").update(minReplicas=5), "minReplicas <="),
    "restart-always-with-autoscaler-v2": (
        "raycluster.yaml",
        lambda d: _worker(d, "cpu")["template"]["spec"].update(restartPolicy="Always"),
        "restartPolicy",
    ),
    "token-auth-on-old-ray": (
        "raycluster.yaml",
        lambda d: d["spec"].update(rayVersion="2.51.0"),
        "rayVersion 2.52.0",
    ),
    "ttl-without-shutdown": (
        "rayjob-train.yaml",
        lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
        "ttlSecondsAfterFinished",
    ),
    "cluster-spec-and-selector": (
        "rayjob-preprocess.yaml",
        lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "mltr"}),
        "exactly one",
    ),
    "unknown-submissionMode": (
        "rayjob-train.yaml",
        lambda d: d["spec"].update(submissionMode="K8sJob"),
        "submissionMode",
    ),
    "wrong-apiVersion": (
        "rayjob-pipeline.yaml",
        lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        "apiVersion",
    ),
}


@pytest.mark.parametrize("case", OPERATOR_BREAKS)
def test_operator_checks_refuse_a_broken_copy(case, tmp_path):
    name, edit, expected = OPERATOR_BREAKS[case]
    problems = operator_problems(load(edited_copy(tmp_path, ROOT / "infra" / "kuberay" / name, edit)))
    assert any(expected in p for p in problems), problems


MLTR_BREAKS = {
    "work-on-the-head": (
        "raycluster.yaml",
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "8"}),
        "num-cpus",
    ),
    "no-token-auth": (
        "rayjob-train.yaml",
        lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
        "authOptions.mode must be token",
    ),
    "gpu-pods-kept-idle": (
        "raycluster.yaml",
        lambda d: _worker(d, "gpu").update(minReplicas=1),
        "minReplicas",
    ),
    "no-cpu-group": (
        "raycluster.yaml",
        lambda d: d["spec"].update(workerGroupSpecs=[_worker(d, "gpu")]),
        "CPU-only",
    ),
    "no-mlflow-settings": (
        "rayjob-tune.yaml",
        lambda d: _worker(d, "cpu")["template"]["spec"]["containers"][0]["envFrom"].pop(),
        "lacks secretRef mltr-mlflow",
    ),
    "literal-secret-key": (
        "raycluster.yaml",
        lambda d: _head_container(d).update(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"}]),
        "AWS_SECRET_ACCESS_KEY must come from a secretKeyRef",
    ),
}


@pytest.mark.parametrize("case", MLTR_BREAKS)
def test_mltr_checks_refuse_a_broken_copy(case, tmp_path):
    name, edit, expected = MLTR_BREAKS[case]
    problems = mltr_problems(load(edited_copy(tmp_path, ROOT / "infra" / "kuberay" / name, edit)))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("name", RAYJOBS)
def test_a_rayjob_that_hangs_is_failed_within_its_deadline_and_cleaned_up(name):
    spec = load(ROOT / "infra" / "kuberay" / name)["spec"]
    assert 3600 <= spec["activeDeadlineSeconds"] <= 14 * 24 * 3600
    assert spec["shutdownAfterJobFinishes"] is True  # a failed or timed-out RayJob's cluster goes too


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_cluster_has_the_node_types_of_raycluster(name):
    raycluster = load(ROOT / "infra" / "kuberay" / "raycluster.yaml")
    assert shape_differences(load(ROOT / "infra" / "kuberay" / name), raycluster) == []


def test_node_type_comparison_refuses_a_drifted_copy(tmp_path):
    def drift(doc):
        _worker(doc, "gpu")["template"]["spec"]["containers"][0]["image"] = "rayproject/ray:2.60.0-py311-gpu"

    raycluster = load(ROOT / "infra" / "kuberay" / "raycluster.yaml")
    drifted = load(edited_copy(tmp_path, ROOT / "infra" / "kuberay" / "rayjob-train.yaml", drift))
    assert shape_differences(drifted, raycluster) == ["group gpu"]


def entrypoint_problem(doc: dict, monkeypatch) -> str | None:
    """Why the RayJob's entrypoint is not ``python -m jobs.<stage>`` with flags the stage takes."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    if argv[:2] != ["python", "-m"] or not argv[2].startswith("jobs."):
        return f"entrypoint {argv[:3]} is not python -m jobs.<stage>"
    if importlib.util.find_spec(argv[2]) is None:
        return f"no stage {argv[2]}"
    module = importlib.import_module(argv[2])
    monkeypatch.setattr(module, "run_job", lambda name, fn: 0)  # parse the flags, run nothing
    try:
        module.main(argv[3:])
    except SystemExit as exc:
        return f"{argv[2]} refuses its flags (exit status {exc.code})"
    return None


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_entrypoint_is_a_stage_with_flags_it_takes(name, monkeypatch):
    doc = load(ROOT / "infra" / "kuberay" / name)
    assert entrypoint_problem(doc, monkeypatch) is None


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("--num-workers 8", "--num-wokers 8", "jobs.train refuses its flags (exit status 2)"),
        ("python -m jobs.train", "python -m jobs.trian", "no stage jobs.trian"),
        ("python -m jobs.train", "python jobs/train.py", "is not python -m jobs.<stage>"),
    ],
)
def test_entrypoint_check_refuses_a_broken_copy(old, new, expected, tmp_path, monkeypatch):
    path = tmp_path / "rayjob-train.yaml"
    shutil.copy(ROOT / "infra" / "kuberay" / "rayjob-train.yaml", path)
    edit_text(path, old, new)
    assert expected in (entrypoint_problem(load(path), monkeypatch) or "")


# --- Ray's cluster launcher -------------------------------------------------------------------


def launcher_problems(path: Path) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(path)
    try:
        validate_config(prepare_config(copy.deepcopy(raw)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError: Ray's own refusals
        return [f"Ray refuses {path.name}: {str(exc).splitlines()[0]}"]
    problems = []
    if raw["provider"]["type"] != "aws":
        problems.append("provider is not aws")
    types = raw["available_node_types"]
    if types[raw["head_node_type"]]["resources"] != {"CPU": 0}:
        problems.append("the head must offer Ray no CPU (resources: {CPU: 0})")
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    if not any(t["resources"].get("GPU", 0) > 0 and t.get("min_workers") == 0 for t in workers.values()):
        problems.append("no GPU node type with min_workers 0")
    if not any(t["resources"].get("GPU", 0) == 0 for t in workers.values()):
        problems.append("no CPU-only node type for Ray Data")
    # Left out, Ray fills these from its defaults, which install a nightly Ray over the image's.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        if key not in raw:
            problems.append(f"{key} is not set: Ray's defaults would be used")
    return problems


def test_launcher_config_passes_rays_own_validation():
    assert launcher_problems(ROOT / "infra" / "aws" / "cluster.yaml") == []


LAUNCHER_BREAKS = {
    "min-workers-not-an-integer": (
        lambda d: d["available_node_types"]["gpu"].update(min_workers="0"),
        "Ray refuses cluster.yaml: '0' is not of type 'integer'",
    ),
    "misspelt-top-level-key": (
        lambda d: d.update(max_worker=d.pop("max_workers")),
        "'max_worker' was unexpected",
    ),
    "head-type-not-a-node-type": (lambda d: d.update(head_node_type="ray.head"), "head_node_type"),
    "node-type-without-resources": (
        lambda d: d["available_node_types"]["cpu"].pop("resources"),
        "'resources' is a required property",
    ),
    "work-on-the-head": (
        lambda d: d["available_node_types"]["head"].update(resources={"CPU": 8}),
        "no CPU",
    ),
    "default-setup-commands": (lambda d: d.pop("setup_commands"), "setup_commands is not set"),
}


@pytest.mark.parametrize("case", LAUNCHER_BREAKS)
def test_launcher_checks_refuse_a_broken_copy(case, tmp_path):
    edit, expected = LAUNCHER_BREAKS[case]
    problems = launcher_problems(edited_copy(tmp_path, ROOT / "infra" / "aws" / "cluster.yaml", edit))
    assert any(expected in p for p in problems), problems


# --- docker compose -----------------------------------------------------------------------------

COMPOSE_OPTIONS_WITH_VALUE = {"-f", "--file", "-p", "--project-name", "--env-file", "--profile"}


def readme_services(readme: str) -> set[str]:
    """Services that ``docker compose`` lines of the README name (flags there take no value)."""
    services = set()
    for line in readme.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("docker compose "):
            continue
        args = shlex.split(line)[2:]
        while args and args[0].startswith("-"):
            args = args[2:] if args[0] in COMPOSE_OPTIONS_WITH_VALUE else args[1:]
        services |= {arg for arg in args[1:] if not arg.startswith("-")}
    return services


def dotenv_keys(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose_problems(infra: Path) -> list[str]:
    compose = load(infra / "compose.yaml")
    services = compose["services"]
    problems = []
    named = readme_services((infra / "README.md").read_text())
    if not named:
        problems.append("infra/README.md runs no `docker compose` service")
    problems += [
        f"README names service {s!r}, which compose.yaml lacks" for s in sorted(named - set(services))
    ]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for dep, how in depends.items() if isinstance(depends, dict) else ((d, {}) for d in depends):
            if dep not in services:
                problems.append(f"{name} depends on {dep!r}, which is not a service")
                continue
            condition = (how or {}).get("condition")
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name} waits for {dep} to be healthy, which has no healthcheck")
            if condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"{name} waits for {dep} to complete, which restarts")
        if service.get("restart") == "unless-stopped" and "healthcheck" not in service:
            problems.append(f"{name} runs for good without a healthcheck")
        # Bind mounts come from infra/, and what a service's script reads through one is there (a
        # renamed policy file would stop createbuckets halfway).
        script = yaml.safe_dump([service.get("entrypoint"), service.get("command")])
        for volume in service.get("volumes") or []:
            if not (isinstance(volume, str) and volume.startswith("./")):
                continue  # a named volume
            source, target = volume.split(":")[:2]
            if not (infra / source).exists():
                problems.append(f"{name} mounts {source}, which infra/ lacks")
                continue
            for used in re.findall(re.escape(target.rstrip("/")) + r"/([\w.\-/]+)", script):
                if not (infra / source / used).is_file():
                    problems.append(
                        f"{name} reads {target.rstrip('/')}/{used}, which infra/{source[2:]} lacks"
                    )
    # ${VAR}, ${VAR:?why} and ${VAR?why} need a value from .env; $${VAR} is the container's own.
    text = (infra / "compose.yaml").read_text()
    needed = {m[0] for m in re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?\?[^}]*)?\}", text)}
    listed = dotenv_keys(infra / ".env.example")
    problems += [
        f"compose needs {var}, which .env.example does not list" for var in sorted(needed - set(listed))
    ]
    return problems


def test_compose_runs_the_services_the_readme_names():
    assert compose_problems(ROOT / "infra") == []


COMPOSE_BREAKS = {
    "readme-names-a-missing-service": (
        "README.md",
        "logs createbuckets",
        "logs make-buckets",
        "README names service 'make-buckets'",
    ),
    "depends-on-a-missing-service": (
        "compose.yaml",
        "      postgres:\n        condition: service_healthy",
        "      postgresql:\n        condition: service_healthy",
        "depends on 'postgresql'",
    ),
    "waits-for-health-it-cannot-see": (
        "compose.yaml",
        '    healthcheck:\n      test: ["CMD", "mc", "ready", "local"]\n      interval: 5s\n'
        "      timeout: 5s\n      retries: 12\n    restart: unless-stopped\n",
        "",
        "minio to be healthy, which has no healthcheck",
    ),
    "script-reads-a-file-the-mount-lacks": (
        "compose.yaml",
        "/policies/mltr-mlflow.json",
        "/policies/mltr-artifacts.json",
        "createbuckets reads /policies/mltr-artifacts.json, which infra/minio lacks",
    ),
    "mounts-a-folder-infra-lacks": (
        "compose.yaml",
        "./minio:/policies:ro",
        "./policies:/policies:ro",
        "createbuckets mounts ./policies, which infra/ lacks",
    ),
    "secret-missing-from-env-example": (
        ".env.example",
        "POSTGRES_PASSWORD=\n",
        "",
        "compose needs POSTGRES_PASSWORD",
    ),
}


@pytest.mark.parametrize("case", COMPOSE_BREAKS)
def test_compose_checks_refuse_a_broken_copy(case, tmp_path):
    name, old, new, expected = COMPOSE_BREAKS[case]
    root = tree_copy(tmp_path)
    edit_text(root / "infra" / name, old, new)
    problems = compose_problems(root / "infra")
    assert any(expected in p for p in problems), problems


# --- One version of Ray, Python, torch and MLflow ----------------------------------------------

IMAGE_TAG = re.compile(r":(?P<project>[\d.]+)-ray(?P<ray>[\d.]+)-py(?P<py>\d)(?P<pyminor>\d+)-gpu$")
DOCKER_BASE = re.compile(r"^FROM\s+rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<pyminor>\d+)-gpu\s*$", re.M)


def pyproject(root: Path) -> dict:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def requirement(project: dict, name: str) -> Requirement:
    return next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == name)


def ray_and_python_problems(root: Path) -> list[str]:
    """One Ray and one Python in rayVersion, the image tags and the Dockerfile, both as pyproject allows."""
    project, infra = pyproject(root), root / "infra"
    rays: dict[str, str] = {}  # where -> version
    pythons: dict[str, str] = {}
    images: dict[str, str] = {}
    for path in sorted((infra / "kuberay").glob("*.yaml")):
        doc = load(path)
        rays[f"{path.name} rayVersion"] = str(cluster_spec(doc).get("rayVersion"))
        images |= {f"{path.name} {where}": c["image"] for where, c in containers(doc) if "image" in c}
    images["aws/cluster.yaml"] = load(infra / "aws" / "cluster.yaml")["docker"]["image"]
    problems = []
    if len(set(images.values())) > 1:
        problems.append(
            f"the manifests and the launcher run different images: {sorted(set(images.values()))}"
        )
    for where, image in images.items():
        tag = IMAGE_TAG.search(image)
        if not tag:
            problems.append(f"{where}: image {image} has no <project>-ray<version>-py<XY>-gpu tag")
            continue
        rays[f"{where} image"], pythons[f"{where} image"] = tag["ray"], f"{tag['py']}.{tag['pyminor']}"
        if tag["project"] != project["version"]:
            problems.append(
                f"{where}: image tag says mltr {tag['project']}, pyproject.toml {project['version']}"
            )
    dockerfile = (infra / "Dockerfile").read_text()
    base = DOCKER_BASE.search(dockerfile)
    if not base:
        problems.append("infra/Dockerfile does not start FROM rayproject/ray:<version>-py<XY>-gpu")
    else:
        rays["Dockerfile FROM"], pythons["Dockerfile FROM"] = base["ray"], f"{base['py']}.{base['pyminor']}"
    for i, pin in enumerate(re.findall(r"ray\[[^\]]*\]==([\d.]+)", dockerfile)):
        rays[f"Dockerfile pin {i}"] = pin
    if len(set(rays.values())) != 1:
        problems.append(f"Ray versions differ: {rays}")
    ray = requirement(project, "ray")
    problems += [
        f"{w}: Ray {v} does not satisfy pyproject's {ray}"
        for w, v in rays.items()
        if Version(v) not in ray.specifier
    ]
    if len(set(pythons.values())) != 1:
        problems.append(f"Python versions differ: {pythons}")
    allowed = SpecifierSet(project["requires-python"])
    problems += [f"{w}: Python {v} is not {allowed}" for w, v in pythons.items() if Version(v) not in allowed]
    return problems


def pin_problems(root: Path) -> list[str]:
    """The Dockerfile's torch and torchvision are the Makefile's TORCH_PINS; MLflow is one release in
    the cluster image and the compose server, as pyproject allows; the README installs the KubeRay
    whose CRDs the manifests are validated against."""
    infra, problems = root / "infra", []
    dockerfile = (infra / "Dockerfile").read_text()
    pins_line = re.search(r"^TORCH_PINS\s*:?=\s*(.+)$", (root / "Makefile").read_text(), re.M)
    makefile_pins = dict(re.findall(r"\b(torch|torchvision)==(\S+)", pins_line[1] if pins_line else ""))
    docker_pins = re.findall(r"\b(torch|torchvision)==(\S+)", dockerfile)
    if not makefile_pins or {name for name, _ in docker_pins} != set(makefile_pins):
        problems.append(f"Dockerfile pins {docker_pins}, the Makefile's TORCH_PINS {makefile_pins}")
    problems += [
        f"Dockerfile pins {name}=={v}, the Makefile {name}=={makefile_pins.get(name)}"
        for name, v in docker_pins
        if makefile_pins.get(name) != v
    ]
    mlflows = {
        "Dockerfile": re.findall(r"\bmlflow==([\d.]+)", dockerfile),
        "mlflow.Dockerfile": re.findall(
            r"mlflow(?:\[auth\])?==([\d.]+)", (infra / "mlflow.Dockerfile").read_text()
        ),
        "compose image": re.findall(r"image: mltr-mlflow:([\d.]+)", (infra / "compose.yaml").read_text()),
    }
    found = {v for versions in mlflows.values() for v in versions}
    if len(found) != 1 or not all(mlflows.values()):
        problems.append(f"MLflow versions differ: {mlflows}")
    mlflow = requirement(pyproject(root), "mlflow")
    problems += [
        f"MLflow {v} does not satisfy pyproject's {mlflow}"
        for v in found
        if Version(v) not in mlflow.specifier
    ]
    vendored = re.findall(r"KubeRay operator \*\*v([\d.]+)\*\*", (CRDS / "README.md").read_text())
    installed = re.findall(r"kuberay/kuberay-operator --version (\S+)", (infra / "README.md").read_text())
    if not vendored or installed != vendored:
        problems.append(f"infra/README.md installs KubeRay {installed}; tests/data/kuberay holds {vendored}")
    return problems


def test_one_version_of_ray_and_python_as_pyproject_allows():
    assert ray_and_python_problems(ROOT) == []


def test_torch_mlflow_and_kuberay_pins_agree():
    assert pin_problems(ROOT) == []


VERSION_BREAKS = {
    "rayVersion-behind-the-image": (
        "infra/kuberay/raycluster.yaml",
        'rayVersion: "2.60.0"',
        'rayVersion: "2.59.0"',
        "Ray versions differ",
    ),
    "image-tag-of-another-ray": (
        "infra/aws/cluster.yaml",
        "mltr:0.1.0-ray2.60.0-py311-gpu",
        "mltr:0.1.0-ray2.61.0-py311-gpu",
        "different images",
    ),
    "base-image-of-another-ray": (
        "infra/Dockerfile",
        "FROM rayproject/ray:2.60.0",
        "FROM rayproject/ray:2.59.0",
        "Ray versions differ",
    ),
    "ray-older-than-pyproject-allows": (
        "pyproject.toml",
        '"ray[default,data,train,tune]>=2.60"',
        '"ray[default,data,train,tune]>=2.61"',
        "does not satisfy",
    ),
    "python-pyproject-refuses": (
        "pyproject.toml",
        'requires-python = ">=3.10"',
        'requires-python = ">=3.12"',
        "Python 3.11 is not >=3.12",
    ),
    "torch-pin-moved": (
        "Makefile",
        "torch==2.14.1",
        "torch==2.15.0",
        "Dockerfile pins torch==2.14.1, the Makefile torch==2.15.0",
    ),
    "mlflow-server-and-client-differ": (
        "infra/mlflow.Dockerfile",
        "mlflow[auth]==3.17.2",
        "mlflow[auth]==3.18.0",
        "MLflow versions differ",
    ),
    "operator-other-than-the-crds": (
        "infra/README.md",
        "kuberay/kuberay-operator --version 1.7.0",
        "kuberay/kuberay-operator --version 1.6.2",
        "installs KubeRay ['1.6.2']",
    ),
    "project-version-moved": (
        "pyproject.toml",
        'version = "0.1.0"',
        'version = "0.2.0"',
        "image tag says mltr 0.1.0",
    ),
}


@pytest.mark.parametrize("case", VERSION_BREAKS)
def test_version_check_refuses_a_broken_copy(case, tmp_path):
    name, old, new, expected = VERSION_BREAKS[case]
    root = tree_copy(tmp_path)
    edit_text(root / name, old, new)
    problems = ray_and_python_problems(root) + pin_problems(root)
    assert any(expected in p for p in problems), problems


# --- No credential written in infra/ ------------------------------------------------------------

# NAME: value or NAME=value of a credential variable or setting, of either case (MLflow's auth ini
# has admin_password); the value may only be empty or a reference ($VAR, ${VAR}, "$(command)").
# A URI's user:password@ likewise. infra/.env is the user's own, never committed.
CREDENTIAL_ASSIGNMENT = re.compile(
    r"(?<![/.~])\b([A-Z][A-Z0-9_]*(?:SECRET|PASSWORD|TOKEN|ACCESS_KEY)[A-Z0-9_]*)[\"']?[ \t]*[:=][ \t]*([^\s#,]*)",
    re.IGNORECASE,
)
URI_CREDENTIAL = re.compile(r"(://[^/\s:@]+):([^@\s/]+)@")


def literal_credentials(infra: Path) -> list[str]:
    found = []
    for path in sorted(p for p in infra.rglob("*") if p.is_file() and p.name != ".env"):
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            pairs = CREDENTIAL_ASSIGNMENT.findall(line) + URI_CREDENTIAL.findall(line)
            for name, value in pairs:
                if value and not re.match(r"""["']?\$""", value):
                    found.append(f"{path.relative_to(infra)}:{number}: {name} = {value}")
        if path.suffix in (".yaml", ".yml"):
            found += [
                f"{path.relative_to(infra)}: a Secret manifest"
                for doc in yaml.safe_load_all(text)
                if isinstance(doc, dict) and doc.get("kind") == "Secret"
            ]
    return found


def test_no_credential_is_written_in_infra():
    assert literal_credentials(ROOT / "infra") == []


CREDENTIAL_BREAKS = {
    "compose-literal": (
        "compose.yaml",
        "AWS_SECRET_ACCESS_KEY: ${MLTR_ARTIFACTS_S3_SECRET_KEY:?set MLTR_ARTIFACTS_S3_SECRET_KEY in infra/.env}",
        "AWS_SECRET_ACCESS_KEY: minio123",
        "compose.yaml",
    ),
    "env-example-with-a-value": (
        ".env.example",
        "MLTR_S3_SECRET_KEY=\n",
        "MLTR_S3_SECRET_KEY=s3cr3t\n",
        ".env.example",
    ),
    "readme-literal": (
        "README.md",
        '--from-literal=AWS_SECRET_ACCESS_KEY="$MLTR_S3_SECRET_KEY"',
        "--from-literal=AWS_SECRET_ACCESS_KEY=s3cr3t",
        "README.md",
    ),
    "auth-ini-admin-password": (
        "mlflow-auth.ini",
        "database_uri =",
        "admin_password = hunter2\ndatabase_uri =",
        "admin_password = hunter2",
    ),
    "password-in-a-uri": (
        "compose.yaml",
        "$${POSTGRES_USER}:$${POSTGRES_PASSWORD}@postgres",
        "mlflow:s3cr3tpw@postgres",
        "://mlflow = s3cr3tpw",
    ),
    "secret-manifest": (
        "kuberay/raycluster.yaml",
        "apiVersion: ray.io/v1\n",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: mltr-s3}\nstringData: {aws: x}\n---\napiVersion: ray.io/v1\n",
        "a Secret manifest",
    ),
}


@pytest.mark.parametrize("case", CREDENTIAL_BREAKS)
def test_credential_scan_refuses_a_broken_copy(case, tmp_path):
    name, old, new, expected = CREDENTIAL_BREAKS[case]
    root = tree_copy(tmp_path)
    edit_text(root / "infra" / name, old, new)
    found = literal_credentials(root / "infra")
    assert any(expected in f for f in found), found
