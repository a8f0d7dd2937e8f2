"""Every shipped file under deploy/ loads and validates with the schema that reads it."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from lofi.config import load_config
from lofi.fidelity import PRESETS, FidelitySchedule
from lofi.memory_cli import PlanMemoryConfig
from pipelines.cli import COMMANDS
from pipelines.config import PipelineConfig
from pipelines.prepare import PrepareConfig
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
        for level in [*FidelitySchedule(cfg.fidelity).levels(), PRESETS[cfg.data.full_level]]:
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
