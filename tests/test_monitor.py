"""System monitor numbers come from the machine itself, read on each Ray node."""

import os

import psutil
import torch


def test_system_stats_per_node(client):
    (node,) = client.system()  # the test session's Ray has one node: this machine
    assert node["cpu_count"] == os.cpu_count()
    assert node["memory_total"] == psutil.virtual_memory().total
    assert 0 < node["memory_used"] < node["memory_total"]
    assert 0.0 <= node["cpu_percent"] <= 1.0
    assert 0 < node["disk_used"] < node["disk_total"]
    assert node["resources"]["CPU"] == os.cpu_count()
    if torch.cuda.is_available():
        assert len(node["gpus"]) == torch.cuda.device_count()
        assert all(0 < g["memory_total"] and 0 <= g["utilization"] <= 1 for g in node["gpus"])
    else:
        assert node["gpus"] == []
