"""System monitor: CPU, memory, disk and GPU use of every node in the Ray cluster.

One tiny task is pinned to each alive node (NodeAffinitySchedulingStrategy) and reads that
machine's numbers with psutil and, where an NVIDIA driver is present, NVML. No number is
estimated: a node without a GPU reports an empty GPU list.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def gpu_stats() -> list[dict[str, Any]]:
    """Memory and utilisation of each NVIDIA GPU on this machine; [] without a driver or NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "memory_used": int(mem.used), "memory_total": int(mem.total),
                         "utilization": float(util.gpu) / 100})
        return gpus
    finally:
        pynvml.nvmlShutdown()


def machine_stats(disk_path: str) -> dict[str, Any]:
    """This machine's CPU, memory and disk (of the filesystem holding `disk_path`) and GPUs."""
    path = Path(disk_path)
    while not path.exists() and path != path.parent:  # the data root may not exist yet on this node
        path = path.parent
    vm, disk = psutil.virtual_memory(), psutil.disk_usage(str(path))
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_percent": psutil.cpu_percent(interval=0.2) / 100,
        "load_1m": os.getloadavg()[0],
        "memory_used": int(vm.total - vm.available), "memory_total": int(vm.total),
        "disk_path": str(path), "disk_used": int(disk.used), "disk_total": int(disk.total),
        "gpus": gpu_stats(),
    }


@ray.remote(num_cpus=0)
def _node_stats(disk_path: str) -> dict[str, Any]:
    return machine_stats(disk_path)


def cluster_stats(disk_path: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """One entry per alive Ray node: its address and resources plus `machine_stats` read there."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [_node_stats.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(disk_path) for n in nodes]
    stats = ray.get(refs, timeout=timeout)
    return [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
             "resources": n.get("Resources", {}), **s} for n, s in zip(nodes, stats)]
