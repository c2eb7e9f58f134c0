"""System: CPU, memory, disk and GPU use of every node of the Ray cluster, and the model worker."""

from __future__ import annotations

import streamlit as st

from ui.components.client import get_client, guard

GB = 1024 ** 3


def usage(col, label: str, used: float, total: float, unit: str = "GB") -> None:
    col.metric(label, f"{used / GB:,.1f} / {total / GB:,.1f} {unit}" if unit else f"{used:.0%}")
    col.progress(min(used / total, 1.0) if total else 0.0)


def node_panel(node: dict) -> None:
    st.markdown(f"**{node['hostname']}** `{node['address']}` · {node['cpu_count']} CPU cores · "
                f"Ray resources: {', '.join(f'{k} {v:g}' for k, v in sorted(node['resources'].items()) if '_group_' not in k and not k.startswith('node:'))}")
    c = st.columns(3)
    usage(c[0], f"CPU (load {node['load_1m']:.2f})", node["cpu_percent"], 1.0, unit="")
    usage(c[1], "Memory", node["memory_used"], node["memory_total"])
    usage(c[2], f"Disk ({node['disk_path']})", node["disk_used"], node["disk_total"])
    if not node["gpus"]:
        st.caption("No GPU on this node.")
    for g in node["gpus"]:
        g1, g2 = st.columns(2)
        usage(g1, f"GPU {g['index']} {g['name']} memory", g["memory_used"], g["memory_total"])
        usage(g2, f"GPU {g['index']} utilisation", g["utilization"], 1.0, unit="")


def page() -> None:
    st.title("System")
    client = get_client()
    if st.button("Refresh", icon=":material/refresh:"):
        st.rerun()
    for node in client.system():
        with st.container(border=True):
            node_panel(node)
    workers = client.workers_status()
    st.subheader("Model workers")
    if not workers:
        st.caption("No job has run yet, so no model worker has started.")
    for status in workers:
        st.markdown(f"**{status['name']}** · device `{status['device']}` · {status['threads']} torch threads · "
                    f"{'busy with `' + status['busy'] + '`' if status['busy'] else 'idle'} · "
                    f"models loaded: {', '.join(f'`{m}`' for m in status['loaded']) or 'none'}")


guard(page)
