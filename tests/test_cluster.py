"""The files that take mathprm to a cluster, checked offline: the cluster-launcher YAML against
Ray's schema and Ray's own config preparation, the KubeRay manifests against the repository and
each other, every job config against its job's dataclass, the GPU twins of the job configs
against their CPU configs, and the Serve configs against Serve's schema and ServeConfig.

Nothing here starts Ray or reaches a cloud: what `ray up` does beyond preparing the config
(asking the provider for node resources, creating keys, roles and firewall rules) needs cloud
credentials and is left out, so that part of each launcher file is only checked by reading it.
"""

import copy
import dataclasses
import importlib
import json
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from mathprm.config import load_config, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "mathprm" / "configs").glob("*.yaml"))
GPU_CONFIGS = [p for p in CONFIGS if p.stem.endswith("_gpu")]
LAUNCHERS = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
KUBERAY = REPO / "cluster" / "kuberay"
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))
# The fields a GPU twin may change: where the work runs, never what it computes.
HARDWARE = {"use_gpu", "precision", "num_workers", "cpus_per_worker", "backend", "device", "generator_options",
            "num_actors", "cpus_per_actor", "gpus_per_actor",
            "strategy", "placement", "rollout", "reward"}  # PPO's roles: where the sampling and scoring run
GPU_FIELDS = {"use_gpu", "backend", "gpus_per_actor", "device"}  # a config with one can run on a GPU


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _dataclass_named_in(path: Path) -> type:
    """The config dataclass a job config names on its first line (`# mathprm.train.sft.SFTConfig: ...`)."""
    first = path.read_text().splitlines()[0]
    match = re.match(r"# (mathprm\.[\w.]+)\.(\w+)", first)
    assert match, f"{path.name}: the first line must name its dataclass, e.g. '# mathprm.train.sft.SFTConfig: ...'"
    return getattr(importlib.import_module(match.group(1)), match.group(2))


def _job_dataclasses() -> dict[str, type]:
    """jobs/<script>.py -> the dataclass its `mathprm` command parses (`cli.COMMANDS`)."""
    from mathprm import cli

    jobs = {}
    for script in sorted((REPO / "jobs").glob("*.py")):
        command = re.search(r'main\(\["([a-z-]+)"', script.read_text()).group(1)
        module, _, name = cli.COMMANDS[command].config.partition(":")
        jobs[f"jobs/{script.name}"] = getattr(importlib.import_module(module), name)
    return jobs


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ----------------------------------------------------------------------------- job configs and GPU twins


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_every_job_config_loads_into_its_jobs_dataclass(path):
    cls = _dataclass_named_in(path)
    assert cls in _job_dataclasses().values(), f"{path.name}: no job in jobs/ parses {cls.__name__}"
    cfg = load_config(cls, path)  # a field the dataclass lacks is a ConfigError naming it
    assert set(_raw(path)) <= {f.name for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_ids(GPU_CONFIGS))
def test_a_gpu_twin_changes_only_where_the_work_runs(path):
    cpu = path.with_name(path.name.replace("_gpu.yaml", ".yaml"))
    assert cpu.is_file(), f"{path.name} has no CPU twin {cpu.name}"
    gpu_raw, cpu_raw = _raw(path), _raw(cpu)
    changed = {k for k in gpu_raw.keys() | cpu_raw.keys() if gpu_raw.get(k) != cpu_raw.get(k)}
    assert changed <= HARDWARE, f"{path.name} changes {sorted(changed - HARDWARE)}, not only hardware fields"
    cls = _dataclass_named_in(path)
    assert cls is _dataclass_named_in(cpu)
    cfg = load_config(cls, path)
    # Every GPU switch the dataclass has is on.
    expected = {"use_gpu": True, "precision": "bf16", "backend": "vllm", "device": "cuda"}
    for name, value in expected.items():
        if hasattr(cfg, name):
            assert getattr(cfg, name) == value, f"{path.name}: {name} should be {value!r}"
    if hasattr(cfg, "gpus_per_actor"):
        assert 0 < cfg.gpus_per_actor <= 1
        # vLLM claims this share of the card's memory: two engines must fit on one GPU.
        assert cfg.generator_options["gpu_memory_utilization"] <= cfg.gpus_per_actor


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in GPU_CONFIGS],
                         ids=_ids([p for p in CONFIGS if p not in GPU_CONFIGS]))
def test_every_job_config_that_can_use_a_gpu_has_a_gpu_twin(path):
    fields = {f.name for f in dataclasses.fields(_dataclass_named_in(path))}
    if not fields & GPU_FIELDS:
        pytest.skip(f"{path.name}: its dataclass has no GPU field")
    twin = path.with_name(path.stem + "_gpu.yaml")
    assert twin.is_file(), f"add {twin.relative_to(REPO)}: {path.name} with only {sorted(HARDWARE)} changed"


# ----------------------------------------------------------------------------- cluster launcher


def _no_network(monkeypatch) -> None:
    """Any connection attempt fails the test: config preparation must stay offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _prepared(path: Path) -> dict:
    """`path` as `ray up` prepares it before it talks to the cloud: Ray's prepare_config (defaults
    of the provider's defaults.yaml merged in, setup commands merged, docker config checked,
    per-type min/max workers filled in), then validate_config (Ray's schema on the result, the
    head type, the sum of min_workers against max_workers). `ray up` then asks the provider
    to fill in node resources and bootstrap keys, roles and networks: cloud calls, skipped here,
    which is why every node type states its resources itself."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_raw(path)))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_launcher_yaml_passes_rays_schema_and_config_preparation(path, monkeypatch):
    import jsonschema
    import ray.autoscaler

    _no_network(monkeypatch)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_raw(path), schema)  # the file as written, before defaults fill it in
    config = _prepared(path)
    assert config["provider"]["type"] == path.stem
    gpu_types = {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types, "no GPU worker type"
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] == 8
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_launcher_yaml_keeps_ray_private_and_installs_mathprm(path):
    config = _prepared(path)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    # The dashboard and Jobs API on the head's loopback only; token authentication on every node.
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head + worker
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands and "RAY_AUTH_TOKEN_PATH=" in commands
        assert f"{_guided_gpu_args()['api_key_env']}=" in commands  # the Serve app's key
    # The head runs no tasks or actors: it advertises no CPUs, and `ray start` agrees.
    head_type = config["available_node_types"][config["head_node_type"]]
    assert head_type["resources"] == {"CPU": 0} and "--num-cpus=0" in head
    # The repository is file-mounted and installed with the GPU stack on every node.
    repo_mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    install = f"cd {repo_mount} && pip install -e '.[vllm]'"
    assert install in config["head_setup_commands"] and install in config["worker_setup_commands"]
    secrets = next(remote for remote, local in config["file_mounts"].items() if "cluster" in local)
    assert secrets.replace("~", "$HOME") in head
    # The same image as cluster/Dockerfile's base (the KubeRay image).
    assert config["docker"]["image"] == _dockerfile()["FROM"]


def _comment_commands(path: Path) -> list[str]:
    """The shell commands in `path`'s comments, continuation lines joined."""
    text = "\n".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    return [c.split("  #")[0].strip() for c in text.replace("\\\n", " ").splitlines()]


@pytest.mark.parametrize("path", LAUNCHERS, ids=_ids(LAUNCHERS))
def test_launcher_comments_submit_real_jobs_with_real_configs(path, monkeypatch):
    monkeypatch.chdir(REPO)
    jobs = _job_dataclasses()
    submitted = set()
    for command in _comment_commands(path):
        for name in re.findall(r"(?:jobs|serve_configs|cluster)/[\w./-]+\.(?:py|yaml)", command):
            assert (REPO / name).is_file(), f"{path.name} names {name}, which does not exist"
        if "ray job submit" in command:
            argv = shlex.split(command.split(" -- ", 1)[1])
            assert argv[0] == "python" and argv[1] in jobs, command
            parse_args(jobs[argv[1]], argv[2:])  # the job's own parser: the config and every override
            submitted.add(argv[1])
    # Every job that has a GPU config is submitted (check_data has none and needs none).
    gpu_jobs = {job for p in GPU_CONFIGS for job, cls in jobs.items() if cls is _dataclass_named_in(p)}
    assert gpu_jobs <= submitted, f"{path.name} does not submit {sorted(gpu_jobs - submitted)}"
    assert any(c.startswith("serve deploy serve_configs/guided_gpu.yaml") for c in _comment_commands(path))


# ----------------------------------------------------------------------------- KubeRay


def _dockerfile() -> dict[str, str]:
    """cluster/Dockerfile's instructions (the last of each kind)."""
    lines = (REPO / "cluster" / "Dockerfile").read_text().splitlines()
    return {line.split()[0]: line.split(None, 1)[1] for line in lines if line and not line.startswith("#")}


def _manifests() -> dict[str, dict]:
    return {p.name: _raw(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def _cluster_specs() -> dict[str, dict]:
    """The RayClusterSpec of each manifest."""
    m = _manifests()
    return {"raycluster.yaml": m["raycluster.yaml"]["spec"],
            "rayjob-mcts.yaml": m["rayjob-mcts.yaml"]["spec"]["rayClusterSpec"],
            "rayservice-guided.yaml": m["rayservice-guided.yaml"]["spec"]["rayClusterConfig"]}


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _guided_gpu() -> dict:
    return _raw(REPO / "serve_configs" / "guided_gpu.yaml")


def _guided_gpu_args() -> dict:
    return _guided_gpu()["applications"][0]["args"]


def test_kuberay_manifests_are_ray_io_v1_with_token_auth_and_no_public_endpoint():
    kinds = {name: (m["apiVersion"], m["kind"]) for name, m in _manifests().items()}
    assert kinds == {"raycluster.yaml": ("ray.io/v1", "RayCluster"), "rayjob-mcts.yaml": ("ray.io/v1", "RayJob"),
                     "rayservice-guided.yaml": ("ray.io/v1", "RayService")}
    for name, spec in _cluster_specs().items():
        assert spec["authOptions"] == {"mode": "token"}, name
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), name
        assert head["rayStartParams"]["num-cpus"] == "0", name  # as on the launcher's head
    assert "serveService" not in _manifests()["rayservice-guided.yaml"]["spec"]  # KubeRay's default: ClusterIP


def test_kuberay_clusters_agree_on_image_python_and_resources():
    specs = _cluster_specs()
    image = _containers(specs["raycluster.yaml"])[0]["image"]
    base = _dockerfile()["FROM"]  # rayproject/ray:<ray version>-py<python>-gpu, the launchers' image too
    ray_version, python = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d+)-gpu", base).groups()
    assert image.split(":")[1] == base.split(":")[1], "the KubeRay image is cluster/Dockerfile's, tagged as its base"
    assert python[0] == "3" and int(python[1:]) >= 10  # pyproject: requires-python >= 3.10
    for launcher in LAUNCHERS:
        assert _raw(launcher)["docker"]["image"] == base
    stripped = {}
    for name, spec in specs.items():
        assert spec["rayVersion"] == ray_version, name
        assert {c["image"] for c in _containers(spec)} == {image}, name
        spec = copy.deepcopy(spec)
        for container in _containers(spec):
            container.pop("env", None)  # the RayService adds the API key; everything else is equal
        stripped[name] = spec
    assert stripped["rayjob-mcts.yaml"] == stripped["raycluster.yaml"]
    assert stripped["rayservice-guided.yaml"] == stripped["raycluster.yaml"]
    # GPU workers: as many GPUs per pod as a launcher GPU node has, requested as limited.
    for group in specs["raycluster.yaml"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"] and resources["limits"]["nvidia.com/gpu"] == "8"
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]


def _shared_mount(spec: dict) -> str:
    """Where every container mounts the shared claim; all must agree."""
    mounts = set()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    assert len(mounts) == 1
    return mounts.pop()


def test_rayjob_runs_the_mcts_job_from_the_image(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = _manifests()["rayjob-mcts.yaml"]["spec"]
    cd, command = (part.strip() for part in spec["entrypoint"].split("&&"))
    assert cd == f"cd {_dockerfile()['WORKDIR']}"  # the image's copy of this repository
    argv = shlex.split(command)
    assert argv[:4] == ["python", "jobs/mcts.py", "--config", "mathprm/configs/mcts_arith_gpu.yaml"]
    cfg = parse_args(_job_dataclasses()["jobs/mcts.py"], argv[2:])
    shared = _shared_mount(spec["rayClusterSpec"])
    assert cfg.policy.startswith(shared + "/") and cfg.out_dir.startswith(shared + "/")
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_guided_gpu_config():
    spec = _manifests()["rayservice-guided.yaml"]["spec"]
    served = yaml.safe_load(spec["serveConfigV2"])
    guided = _guided_gpu()
    assert served["applications"] == guided["applications"]
    # Inside the pod network the serve Service must reach the proxy; the file itself stays loopback.
    assert served["http_options"] == guided["http_options"] | {"host": "0.0.0.0"}
    module, attr = served["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    # Every Ray container has the API key the app reads, and the models on the shared volume.
    key_env = served["applications"][0]["args"]["api_key_env"]
    for container in _containers(spec["rayClusterConfig"]):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env[key_env]["valueFrom"], container["name"]
    shared = _shared_mount(spec["rayClusterConfig"])
    args = served["applications"][0]["args"]
    assert args["policy"].startswith(shared + "/") and args["prm"].startswith(shared + "/")


def test_gpu_demands_fit_one_worker_node():
    """Each GPU job's actors or workers, and the Serve app at its largest, fit on one GPU node
    of every cluster file (jobs do not span nodes: no EFA / GPUDirect networking is set up)."""
    nodes = [t["resources"] for p in LAUNCHERS for t in _raw(p)["available_node_types"].values()
             if t["resources"].get("GPU")]
    for group in _cluster_specs()["raycluster.yaml"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes.append({"CPU": int(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])})
    gpus, cpus = min(n["GPU"] for n in nodes), min(n["CPU"] for n in nodes)
    for path in GPU_CONFIGS:
        cfg = load_config(_dataclass_named_in(path), path)
        if getattr(cfg, "use_gpu", False):
            assert cfg.num_workers <= gpus, path.name  # Ray Train: one GPU per worker
        if getattr(cfg, "gpus_per_actor", 0):
            assert cfg.num_actors * cfg.gpus_per_actor <= gpus, path.name
            assert cfg.num_actors * cfg.cpus_per_actor <= cpus, path.name
    demand = {"CPU": 0.0, "GPU": 0.0}
    for deployment in _guided_gpu()["applications"][0]["deployments"]:
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        for resource in demand:
            demand[resource] += replicas * deployment["ray_actor_options"].get(f"num_{resource.lower()}s", 0)
    assert demand["GPU"] <= gpus and demand["CPU"] <= cpus


# ----------------------------------------------------------------------------- Serve configs


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_fits_serves_schema_and_listens_on_loopback(path, model_dirs):
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeDeploySchema

    from mathprm.serve import load_serve_config

    raw = _raw(path)
    ServeDeploySchema.model_validate(raw)
    # A config without http_options would listen on every interface (Serve's schema default).
    assert raw["http_options"]["host"] == "127.0.0.1"
    for app in raw["applications"]:
        assert app["import_path"] == "mathprm.serve:build_app"
        cfg = load_serve_config(app["args"] | {"policy": str(model_dirs[0]), "prm": str(model_dirs[1])})
        # Serve's schema ignores unknown keys here: a typo would silently change nothing.
        for deployment in app["deployments"]:
            assert deployment["name"] in {"GeneratorDeployment", "PRMDeployment", "SolveAPI"}
            assert set(deployment) <= set(DeploymentSchema.model_fields), deployment["name"]
            assert set(deployment.get("ray_actor_options", {})) <= set(RayActorOptionsSchema.model_fields)
        if path.stem.endswith("_gpu"):
            assert cfg.backend == "vllm" and cfg.device == "cuda"
            gpus = {d["name"]: d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"]}
            assert 0 < gpus["GeneratorDeployment"] <= 1 and 0 < gpus["PRMDeployment"] <= 1
            assert cfg.generator_options["gpu_memory_utilization"] <= gpus["GeneratorDeployment"]
