"""Where replicas run: the device a job chooses, what each replica asks Ray for, and the wait until they are placed.

Placement holds the flags (--device, --gpus-per-replica, --accelerator-type, --placement-timeout,
--tokenize-workers).
`target` turns them and the cluster's resources into a Target: the device, why, the actor options, and the tokenize
workers those options ask CPUs for, which each replica is handed as they are (its one source). The summarization
driver, the fine-tuning driver (through driver.start_replicas) and the Ray Data adapter all ask for replicas this way,
and each replica picks its torch device with `torch_device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import PlacementError
from .footers import describe
from .tokenize_pool import AUTO_MAX_WORKERS

DEVICES = ("auto", "cuda", "cpu")
# Seconds a job waits for Ray to place its replicas (--placement-timeout); their model loads are not counted.
# Long enough for an autoscaler to start a GPU node; short enough that a job asking for GPUs the cluster will
# never have ends with a message rather than hanging.
DEFAULT_PLACEMENT_TIMEOUT = 600.0
# A replica whose process dies this often while loading its model (out of memory, each time) is given up on.
MAX_DEATHS_WHILE_LOADING = 3
# Quantizations that run only on CPU (torch's dynamic int8 matmuls).
CPU_ONLY_QUANTIZATIONS = ("int8-dynamic",)


@dataclass(frozen=True)
class Placement:
    # auto: GPUs if the cluster shows any now, else CPU; cuda: wait for GPUs, never fall back; cpu: no GPU
    device: str = "auto"
    # Ray's num_gpus per replica; a fraction shares a GPU (0.25: four replicas on one)
    gpus_per_replica: float = 1.0
    # one of Ray's accelerator types (ray.util.accelerators), e.g. A100, H100, T4; None: any GPU
    accelerator_type: str | None = None
    # replicas not placed (and loaded) by then are dropped; with none placed the job stops (exit 2)
    placement_timeout: float = DEFAULT_PLACEMENT_TIMEOUT
    # processes that tokenize for each replica (pipeline/tokenize_pool.py), each a CPU more asked of Ray. None
    # (auto): none on CPU, where the cores belong to the model; on a GPU, what its node's CPUs allow (tokenize_workers)
    tokenize_workers: int | None = None

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.gpus_per_replica <= 0:
            raise ValueError(f"--gpus-per-replica must be > 0, got {self.gpus_per_replica:g}")
        if self.gpus_per_replica > 1 and self.gpus_per_replica != int(self.gpus_per_replica):
            # Ray's rule: a share of one GPU, or whole GPUs
            raise ValueError(f"--gpus-per-replica above 1 must be a whole number, got {self.gpus_per_replica:g}")
        if self.placement_timeout <= 0:
            raise ValueError(f"--placement-timeout must be > 0 seconds, got {self.placement_timeout:g}")
        if self.tokenize_workers is not None and self.tokenize_workers < 0:
            raise ValueError(f"--tokenize-workers must be >= 0 or auto, got {self.tokenize_workers}")
        if self.accelerator_type is not None:
            if self.device == "cpu":
                raise ValueError(f"--accelerator-type {self.accelerator_type} asks for GPUs, and --device cpu for none")
            spelled = {name.lower(): name for name in known_accelerator_types()}.get(self.accelerator_type.lower())
            if spelled and spelled != self.accelerator_type:  # Ray matches resource names exactly
                raise ValueError(f"--accelerator-type {self.accelerator_type!r}: Ray spells it {spelled!r}")

    def check(self, quantization: str) -> None:
        """Refuse, before any replica starts, what cannot run on the device asked for."""
        if self.device == "cuda" and quantization in CPU_ONLY_QUANTIZATIONS:
            raise PlacementError(
                f"--quantization {quantization} runs on CPU only, and --device cuda asks for GPUs: use "
                "--quantization auto, int8-weight-only or nf4 on GPUs, or --device cpu"
            )

    def choose(self, cpus_per_replica: int, quantization: str, log) -> Target:
        """The target on the Ray the caller joined, as its resources are now, stated in the log's device line."""
        import ray

        target = self.target(ray.cluster_resources(), cpus_per_replica, quantization, cpus_per_gpu(ray.nodes()))
        log("device", target.describe(), device=target.device, reason=target.reason, options=target.options)
        return target

    def target(
        self, cluster: dict, cpus_per_replica: int, quantization: str = "none", node_cpus_per_gpu: float | None = None
    ) -> Target:
        """The device and the actor options, given `cluster` (ray.cluster_resources()) as it is now, and the fewest
        CPUs per GPU of its GPU nodes (cpus_per_gpu; None: no GPU node now)."""
        self.check(quantization)
        gpus = cluster.get("GPU", 0)
        if self.device == "cpu":
            return self._on_cpu("--device cpu", cpus_per_replica)
        if self.device == "cuda":
            return self._on_gpu("--device cuda: replicas wait for GPUs", cluster, node_cpus_per_gpu)
        if quantization in CPU_ONLY_QUANTIZATIONS:
            return self._on_cpu(f"--quantization {quantization} runs on CPU only", cpus_per_replica)
        if self.accelerator_type:
            return self._on_gpu(f"--accelerator-type {self.accelerator_type} asks for GPUs", cluster, node_cpus_per_gpu)
        if gpus:
            return self._on_gpu(f"the cluster shows {gpus:g} GPU(s)", cluster, node_cpus_per_gpu)
        # Ray has no public call that says whether an autoscaler could add GPU nodes, so auto cannot know
        return self._on_cpu(
            "the cluster shows no GPU; on a cluster that scales GPU nodes from zero, pass --device cuda to wait "
            "for them",
            cpus_per_replica,
        )

    def tokenize_workers_on_gpu(self, node_cpus_per_gpu: float | None) -> int:
        """A GPU replica's tokenize workers: --tokenize-workers, or (auto) its share of its node's CPUs less one for
        its own thread (reading, the model, writing) and one left to Ray Data and the driver, at most
        AUTO_MAX_WORKERS. Without a GPU node to look at (an autoscaler yet to start one), none."""
        if self.tokenize_workers is not None:
            return self.tokenize_workers
        if node_cpus_per_gpu is None:
            return 0
        return max(0, min(AUTO_MAX_WORKERS, int(node_cpus_per_gpu * self.gpus_per_replica) - 2))

    def _on_cpu(self, why: str, cpus_per_replica: int) -> Target:
        # num_gpus stays 0: a replica on a GPU node must not hold a GPU it does not use. Tokenize workers only if
        # asked for: the replica's cores run the model, and tokenizing in its thread costs it little (README)
        workers = self.tokenize_workers or 0
        cores = f"{cpus_per_replica} CPU core(s) per replica" + (f" and {workers} to tokenize" if workers else "")
        return Target("cpu", f"{why}; {cores}", {"num_cpus": cpus_per_replica + workers}, workers)

    def _on_gpu(self, why: str, cluster: dict, node_cpus_per_gpu: float | None = None) -> Target:
        workers = self.tokenize_workers_on_gpu(node_cpus_per_gpu)
        options = {"num_cpus": 1 + workers, "num_gpus": self.gpus_per_replica}
        share = f"{self.gpus_per_replica:g} GPU"
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
            share += f" of type {self.accelerator_type}"
            if f"accelerator_type:{self.accelerator_type}" not in cluster:
                if self.accelerator_type in known_accelerator_types():
                    why += f"; no {self.accelerator_type} node is on the cluster now"
                else:
                    why += f"; {self.accelerator_type} is not one of Ray's known types, nor on the cluster now"
        tokenizing = f", {workers} CPU(s) to tokenize" if workers else ""
        return Target("cuda", f"{why}; {share}{tokenizing} per replica", options, workers)


DEFAULT_PLACEMENT = Placement()


@dataclass(frozen=True)
class Target:
    """What a Placement comes to on one cluster: the device, why, each replica's Ray actor options, and the
    tokenize workers among their CPUs."""

    device: str  # "cuda" or "cpu"
    reason: str
    options: dict  # num_cpus, num_gpus, accelerator_type
    # processes that tokenize for each replica (pipeline/tokenize_pool.py), one CPU each in options["num_cpus"]:
    # handed to the replica's Summarizer as they are
    tokenize_workers: int = 0

    def describe(self) -> str:
        return f"device: {self.device} ({self.reason})"


def cpus_per_gpu(nodes: list[dict]) -> float | None:
    """The fewest CPUs per GPU among the live GPU nodes of ray.nodes(): what a GPU replica's share of CPUs can be on
    any of them; None without a GPU node."""
    ratios = [
        node["Resources"].get("CPU", 0) / node["Resources"]["GPU"]
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("GPU")
    ]
    return min(ratios, default=None)


def known_accelerator_types() -> set[str]:
    """Ray's named accelerator types (ray.util.accelerators). Ray also names other GPUs after their product name,
    so a type outside this set is allowed, with a word in the device line."""
    from ray.util.accelerators import accelerators

    return {value for name, value in vars(accelerators).items() if name.isupper() and isinstance(value, str)}


def wait_until_placed(actors: list, target: Target, timeout: float, log) -> list:
    """The actors that Ray places within `timeout` seconds, once they have loaded their model; the others are
    killed. The timeout is for waiting on resources (GPU nodes that an autoscaler starts): a placed replica's
    model load has no deadline, since a large checkpoint's download can take longer than any placement.

    No unit goes to a replica before this returns, so one that can never be placed holds none. Raises
    PlacementError when none is placed: the message says how many were asked, what each needed and what the
    cluster has, or why the replicas' constructors or model loads failed.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    # Replica.placed answers once Ray has placed the actor, Replica.where once it has loaded its model. A replica
    # whose process dies while loading is placed again by Ray, with a new timeout: asked `placed` again first, so
    # that calls failing while Ray learns of the death are not counted as deaths.
    deadlines = [time.monotonic() + timeout] * len(actors)
    waiting = {actor.placed.remote(): index for index, actor in enumerate(actors)}
    loading: dict = {}
    deaths = [0] * len(actors)
    placed, failures = [], []
    kinds: dict[str, int] = {}  # "cuda bfloat16" -> replicas: GPUs of several kinds may differ in dtype

    def failed(index: int, err: BaseException) -> None:
        failures.append(describe(err))  # a missing CUDA, a dtype the GPU lacks, a broken model
        ray.kill(actors[index], no_restart=True)

    def place_again(index: int) -> None:
        waiting[actors[index].placed.remote()] = index

    while waiting or loading:
        now = time.monotonic()
        for ref, index in list(waiting.items()):
            if deadlines[index] <= now:
                del waiting[ref]
                ray.kill(actors[index], no_restart=True)
        left = min((deadlines[index] for index in waiting.values()), default=now) - now
        done, _ = ray.wait([*waiting, *loading], num_returns=1, timeout=left if waiting else None)
        for ref in done:
            was_loading = ref in loading
            index = (loading if was_loading else waiting).pop(ref)
            try:
                where = ray.get(ref)
            except RayActorError as err:
                if err.actor_init_failed:
                    failed(index, err)
                elif not was_loading:  # a call that reached the process Ray is replacing
                    place_again(index)
                elif (deaths[index] + 1) > MAX_DEATHS_WHILE_LOADING:
                    failed(index, RuntimeError(f"its process died {deaths[index] + 1} times while loading the model"))
                else:  # killed, out of memory, node lost
                    deaths[index] += 1
                    deadlines[index] = time.monotonic() + timeout
                    place_again(index)
                continue
            except RayError as err:
                failed(index, err)
                continue
            if not was_loading:
                loading[actors[index].where.remote()] = index
                continue
            placed.append(index)
            kind = f"{where['device']} {where['dtype']}"
            kinds[kind] = kinds.get(kind, 0) + 1
    if not placed:
        raise PlacementError(_none_placed(len(actors), target, timeout, failures, ray.cluster_resources()))
    log(
        "placed",
        f"{len(placed)} replica(s) placed: " + ", ".join(f"{count} on {kind}" for kind, count in sorted(kinds.items())),
        placed=len(placed),
        kinds=kinds,
    )
    if len(placed) < len(actors):
        missing = len(actors) - len(placed)
        log(
            "unplaced",
            f"WARNING: {missing} of {len(actors)} replicas not placed within {timeout:g} s (each asks for "
            f"{target.options}; the cluster has {_resources(ray.cluster_resources())}): running with {len(placed)}"
            + (f"; a replica failed to start: {failures[0]}" if failures else ""),
            asked=len(actors),
            placed=len(placed),
        )
    return [actors[index] for index in sorted(placed)]


def _none_placed(count: int, target: Target, timeout: float, failures: list[str], cluster: dict) -> str:
    if failures:
        return f"none of the {count} replica(s) started: {failures[0]}"
    return (
        f"none of the {count} replica(s) was placed within --placement-timeout {timeout:g} s: each asks for "
        f"{target.options} and the cluster has {_resources(cluster)}. Use --device cpu, a smaller "
        "--gpus-per-replica, another --accelerator-type, or a longer --placement-timeout while GPU nodes start"
    )


def _resources(cluster: dict) -> str:
    shown = {name: value for name, value in cluster.items() if name in ("CPU", "GPU") or name.startswith("accel")}
    return ", ".join(f"{name} {value:g}" for name, value in sorted(shown.items())) or "nothing"


def torch_device(asked: str, gpu_ids) -> str:
    """The torch device of a replica that Ray gave `gpu_ids`: CUDA where Ray gave it a GPU and torch sees one.

    A GPU that torch cannot see (a CPU-only torch, a GPU resource declared by hand) means CPU, except under
    --device cuda: that asked for GPUs, and a silent CPU run would be far slower than the user planned. It fails
    here, in the replica, because only the replica's own node knows: the driver may run on a CPU-only head.
    """
    import torch

    if gpu_ids and torch.cuda.is_available():
        return "cuda"
    if asked == "cuda":
        import socket

        raise PlacementError(
            f"--device cuda: the replica on {socket.gethostname()} "
            + (f"was given GPU {gpu_ids} by Ray, but torch sees no CUDA device" if gpu_ids else "holds no GPU")
            + f" (torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}). Install a CUDA build "
            "of torch on the GPU nodes, or use --device cpu"
        )
    return "cpu"
