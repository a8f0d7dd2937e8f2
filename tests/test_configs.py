"""Every shipped file under deploy/ loads and validates with the schema that reads it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from lofi.config import load_config
from lofi.fidelity import PRESETS, FidelitySchedule
from lofi.memory_plan import PlanMemoryConfig
from lofi_cli.commands import COMMANDS
from pipelines.config import PipelineConfig
from pipelines.data.prepare_config import PrepareConfig
from tuning.config import SweepConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
# folder under deploy/configs -> the dataclass its files are instances of
SCHEMAS = {"prepare": PrepareConfig, "pipeline": PipelineConfig, "plan_memory": PlanMemoryConfig,
           "sweep": SweepConfig}
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
PAPER = sorted((CONFIGS / "pipeline").glob("*_tsm_r18_gtad_*.yaml"))


def test_every_config_folder_has_a_schema():
    folders = {p.relative_to(CONFIGS).parts[0] for p in SHIPPED}
    assert folders <= set(SCHEMAS), f"add the dataclass of {sorted(folders - set(SCHEMAS))} to SCHEMAS"
    assert {"prepare", "pipeline"} <= folders


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads_with_its_dataclass(path):
    cfg = load_config(SCHEMAS[path.relative_to(CONFIGS).parts[0]], path)
    if isinstance(cfg, PipelineConfig):
        FidelitySchedule(cfg.fidelity).levels()  # overrides resolve to valid levels
    if isinstance(cfg, PrepareConfig):
        cfg.resolved_levels()
    if isinstance(cfg, SweepConfig):  # its pipeline file and every value of its space apply
        from tuning.sweep import check_keys

        check_keys(cfg.base_config(), cfg.space)


def test_the_paper_setups_are_all_shipped_with_the_papers_recipe():
    kinds = {load_config(PipelineConfig, p).fidelity.kind for p in PAPER if p.name.startswith("anet_")}
    assert kinds == {"c_lofi", "s_lofi", "t_lofi", "st_lofi"}
    assert any(p.name.startswith("thumos14_") for p in PAPER)
    for path in PAPER:
        cfg = load_config(PipelineConfig, path)
        t = cfg.train
        assert (t.optimizer, t.lr, t.lr_step_epochs, t.lr_gamma, t.weight_decay, t.batch_size) == \
               ("sgd", 0.1, 5, 0.5, 1e-4, 16), path.name
        assert (cfg.encoder.name, cfg.head.name) == ("tsm_resnet18", "gtad")
        if cfg.fidelity.kind == "c_lofi":
            assert cfg.fidelity.cycle == "epoch", f"{path.name}: Long C-LoFi changes level every epoch"
        assert not cfg.fidelity.overrides, "the paper's levels are the presets"
        assert (PRESETS["full"].num_snippets, PRESETS["full"].size_px, PRESETS["full"].frames_per_snippet) == (100, 224, 8)


# paper pipeline config prefix -> the prepare config that makes its shards
PREPARED_BY = {"anet_": "paper.yaml", "thumos14_": "thumos14.yaml"}


def test_paper_pipelines_read_shard_levels_that_their_prepare_config_writes():
    """Training reads the shard level named like each schedule level, with the same T, F, S."""
    for path in PAPER:
        prefix = next(p for p in PREPARED_BY if path.name.startswith(p))
        prepare = load_config(PrepareConfig, CONFIGS / "prepare" / PREPARED_BY[prefix])
        levels = {lv["name"]: lv for lv in prepare.resolved_levels()}
        cfg = load_config(PipelineConfig, path)
        if cfg.data.full_level not in PRESETS:  # fixed-stride features (THUMOS14): the head runs on windows
            assert levels[cfg.data.full_level]["snippet_stride_sec"] and cfg.data.window_snippets, path.name
        grids = [PRESETS[name] for name in (cfg.data.full_level, cfg.data.pretrain_level) if name in PRESETS]
        for level in [*FidelitySchedule(cfg.fidelity).levels(), *grids]:
            shard = levels[level.name]
            assert (shard["num_snippets"], shard["frames_per_snippet"], shard["size_px"]) == \
                   (level.num_snippets, level.frames_per_snippet, level.size_px), (path.name, level.name)


def test_runtime_env_uses_only_known_fields():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert set(env) <= set(RuntimeEnv.known_fields)
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    assert ".venv/" in env["excludes"]


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cluster = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    validate_config(fillout_defaults(cluster))
    gpu_types = [t["node_config"]["InstanceType"] for t in cluster["available_node_types"].values()]
    assert any(name.startswith(("p4", "p5", "g5", "g6")) for name in gpu_types), "no GPU worker type"


def test_kuberay_rayjob_runs_a_lofi_command_with_token_auth():
    from ray.runtime_env import RuntimeEnv

    job = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "lofi" and argv[1] in COMMANDS
    assert set(yaml.safe_load(job["spec"]["runtimeEnvYAML"])) <= set(RuntimeEnv.known_fields)
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token" and spec["rayVersion"] == "2.60.0"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]]
    assert any(gpus)


# --- deploy/: the image, the cluster files and the MLflow server they share -----------------

DEPLOY = REPO / "deploy"
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))
TOKEN_FILE_ON_CLIENT = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes it


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _ray_cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec in deploy/kuberay: a RayCluster's spec, a RayJob's rayClusterSpec."""
    specs = {}
    for path in KUBERAY:
        for doc in _documents(path):
            if doc.get("kind") == "RayCluster":
                specs[f"{path.name}:RayCluster"] = doc["spec"]
            elif doc.get("kind") == "RayJob":
                specs[f"{path.name}:RayJob"] = doc["spec"]["rayClusterSpec"]
    assert {name.split(":")[1] for name in specs} == {"RayCluster", "RayJob"}, sorted(specs)
    return specs


def _pod_templates(spec: dict) -> dict[str, dict]:
    """Group name -> pod spec, the head's included."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _lofi_images() -> dict[str, str]:
    """Every place that names the LoFi image -> the image it names."""
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    images = {f"cluster.yaml:docker.{key}": cluster["docker"][key]
              for key in ("image", "head_image", "worker_image") if key in cluster["docker"]}
    for name, node_type in cluster["available_node_types"].items():
        if "worker_image" in node_type.get("docker", {}):
            images[f"cluster.yaml:{name}"] = node_type["docker"]["worker_image"]
    for spec_name, spec in _ray_cluster_specs().items():
        for group, pod in _pod_templates(spec).items():
            for container in pod["containers"]:
                images[f"{spec_name}:{group}:{container['name']}"] = container["image"]
    return images


def _readme_build_tag() -> str:
    readme = (DEPLOY / "README.md").read_text()
    match = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", readme)
    assert match, "deploy/README.md shows no `docker build -f deploy/Dockerfile -t IMAGE .`"
    return match.group(1)


def test_every_node_runs_the_image_that_the_readme_builds():
    images = _lofi_images()
    assert len(images) >= 7, images  # cluster.yaml + head, gpu, cpu of the RayCluster and the RayJob
    built = _readme_build_tag()
    assert ":" in built and not built.endswith(":latest"), f"pin a tag, not {built}"
    wrong = {where: image for where, image in images.items() if image != built}
    assert not wrong, f"deploy/README.md builds {built}, but these name another image: {wrong}"


def test_every_kuberay_pod_has_a_memory_backed_dev_shm():
    """Ray's object store lives in /dev/shm: every pod mounts a memory-backed emptyDir of a stated size
    there (a container's own /dev/shm is 64 MB; KubeRay's fallback is as large as the memory limit)."""
    for spec_name, spec in _ray_cluster_specs().items():
        for group, pod in _pod_templates(spec).items():
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
                where = f"{spec_name}:{group}:{container['name']}"
                assert shm, f"{where}: no volume mounted at /dev/shm"
                assert volumes.get(shm[0], {}).get("emptyDir", {}).get("medium") == "Memory", \
                    f"{where}: /dev/shm must be an emptyDir with medium: Memory"


def test_gpu_workers_scale_from_zero_everywhere():
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    gpu_types = [t for t in cluster["available_node_types"].values()
                 if t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    for spec_name, spec in _ray_cluster_specs().items():
        assert spec.get("enableInTreeAutoscaling") is True, spec_name
        gpu_groups = [g for g in spec["workerGroupSpecs"]
                      if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
        assert gpu_groups, f"{spec_name}: no GPU worker group"
        for group in gpu_groups:
            assert group["minReplicas"] == 0 and group["replicas"] == 0, (spec_name, group["groupName"])


def test_token_auth_is_on_in_every_cluster_file():
    for spec_name, spec in _ray_cluster_specs().items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{spec_name}: authOptions.mode is not token"
        assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0), spec_name

    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [shlex.split(c) for c in cluster[key] if "ray start" in c]
        assert len(starts) == 1, f"{key}: expected one `ray start`"
        env = dict(word.split("=", 1) for word in starts[0][:starts[0].index("ray")] if "=" in word)
        assert env.get("RAY_AUTH_MODE") == "token", f"{key}: `ray start` without RAY_AUTH_MODE=token"
        token_path = env.get("RAY_AUTH_TOKEN_PATH")
        assert token_path, f"{key}: `ray start` without RAY_AUTH_TOKEN_PATH"
        assert cluster["file_mounts"].get(token_path) == TOKEN_FILE_ON_CLIENT, \
            f"file_mounts must carry the client's {TOKEN_FILE_ON_CLIENT} to {token_path}, which {key} reads"


def test_the_token_file_mounted_is_where_ray_generates_it():
    """`ray get-auth-token --generate` writes the file that cluster.yaml's file_mounts sends."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert Path(TOKEN_FILE_ON_CLIENT).expanduser() == _get_default_token_path()


def _dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.MULTILINE))


def test_dockerfile_installs_the_makefiles_torch_cuda_build_before_the_project():
    makefile = re.search(r"^TORCH\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
    args = _dockerfile_args()
    assert makefile and args.get("TORCH") == makefile.group(1), \
        f"Dockerfile ARG TORCH={args.get('TORCH')} but the Makefile pins {makefile and makefile.group(1)}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu(126|130)", args.get("TORCH_INDEX_URL", "")), \
        f"torch {makefile.group(1)} has cu126 and cu130 builds; TORCH_INDEX_URL={args.get('TORCH_INDEX_URL')}"
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", args.get("CUDA_IMAGE", ""))
    assert cuda and args["TORCH_INDEX_URL"].endswith("cu" + "".join(cuda.groups())), \
        f"the base image's CUDA ({args.get('CUDA_IMAGE')}) must be the one torch is built for ({args['TORCH_INDEX_URL']})"
    runs = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
            if "pip install" in line and not line.lstrip().startswith("#")]
    torch_at = next((i for i, line in enumerate(runs) if '"${TORCH}"' in line and "${TORCH_INDEX_URL}" in line), None)
    project_at = next((i for i, line in enumerate(runs)  # the install that brings pyproject's dependencies
                       if re.search(r"pip install [^&]*\.(\s|$)", line) and "--no-deps" not in line), None)
    assert torch_at is not None, "no `pip install \"${TORCH}\" --index-url \"${TORCH_INDEX_URL}\"` in the Dockerfile"
    assert project_at is not None, "no `pip install .` (with dependencies) in the Dockerfile"
    assert torch_at < project_at, "install torch's CUDA build before `pip install .`, or pip picks a default build"


def test_dockerfile_repeats_no_dependency_or_version_of_pyproject():
    """pyproject.toml is the one place of the dependencies' versions; the image reads it."""
    import tomllib

    from packaging.requirements import Requirement

    text = (DEPLOY / "Dockerfile").read_text().lower()
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert len(deps) > 5
    commands = "\n".join(line for line in text.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#"))
    arguments = " ".join(re.findall(r"pip install ([^&;|\n]*)", commands))  # each install's words, up to && ; |
    installed = {re.split(r"[\[=<>~!]", word.strip("'\""))[0] for word in arguments.split()}
    repeated = sorted({req.name.lower() for req in deps} & installed - {"torch"})
    assert not repeated, f"Dockerfile installs {repeated} by name: `pip install .` brings them from pyproject.toml"
    for req in deps:
        name = rf"(?<![\w-]){re.escape(req.name.lower())}(\[[^\]]*\])?"
        for spec in req.specifier:  # e.g. ray[...]==2.60.0, or torch>=2.13,<2.15 (no space in between)
            repeated = re.search(rf"{name}[^\s\"']*{re.escape(spec.operator)}\s*{re.escape(spec.version)}(?![\w.])", text)
            assert not repeated, f"Dockerfile repeats {req.name}{spec}: it belongs to pyproject.toml only"
        if req.name != "torch":  # torch's pin is the Makefile's (ARG TORCH); any other pin would drift
            pinned = re.search(rf"{name}\s*(==|>=|<=|~=|!=|<|>)", text)
            assert not pinned, f"Dockerfile pins {req.name} ({pinned.group(0)}): versions live in pyproject.toml"


def test_cluster_yaml_installs_nothing_on_the_nodes():
    """The image holds the dependencies; reinstalling them at boot would drift from it."""
    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for key in keys for c in cluster.get(key) or []]
    for node_type in cluster["available_node_types"].values():
        commands += node_type.get("initialization_commands", []) + node_type.get("worker_setup_commands", [])
    installs = [c for c in commands if re.search(r"\b(pip3?|uv pip|conda|mamba)\s+install\b", c)]
    assert not installs, f"cluster.yaml installs on the nodes: {installs}"
    assert not cluster["docker"]["image"].startswith("rayproject/"), "nodes run the LoFi image"


def test_kuberay_jobs_reach_the_mlflow_server():
    """Every pod's MLFLOW_TRACKING_URI is the Service of mlflow.yaml, and the server accepts that Host."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    docs = {doc["kind"]: doc for doc in _documents(DEPLOY / "kuberay" / "mlflow.yaml")}
    service, deployment = docs["Service"], docs["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").partition("=")[::2] for a in container["args"])
    assert args["backend-store-uri"] and "artifacts-destination" in args and "serve-artifacts" in args
    assert args["artifacts-destination"].startswith("s3://")
    port = service["spec"]["ports"][0]["port"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    assert host in args["allowed-hosts"].split(","), f"MLflow would answer {host} with 403 (--allowed-hosts)"

    uris = {}
    for spec_name, spec in _ray_cluster_specs().items():
        for group, pod in _pod_templates(spec).items():
            for c in pod["containers"]:
                uris[f"{spec_name}:{group}"] = {e["name"]: e.get("value") for e in c.get("env", [])}.get(
                    "MLFLOW_TRACKING_URI")
    assert uris and all(uri == f"http://{host}" for uri in uris.values()), uris

    server = Version(container["image"].rsplit(":v", 1)[1].removesuffix("-full"))
    client = next(Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                  ["dependencies"] if d.startswith("mlflow"))
    assert server in client.specifier, f"MLflow server {server} outside the client's {client}"
