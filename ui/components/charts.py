"""Small line charts, one per metric (metrics differ in scale), and a job's history charted live."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

TRAIN_METRICS = {"loss": "loss", "fvu": "FVU", "l0": "L0", "dead_frac": "dead fraction"}
DISCOVER_METRICS = {"features_in_heap": "features with examples", "heap_examples_count": "examples collected"}
MAX_POINTS = 400
"""Points drawn per line at most: a long run's thousands of log steps are thinned to this many, so
a chart costs the same to send and draw whatever the run's length."""


def thin(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """At most `max_points` rows of `df`, evenly spaced, always keeping the first and last."""
    n = len(df)
    if n <= max_points:
        return df
    picks = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return df.iloc[picks]


def line_charts(df: pd.DataFrame, x: str, x_title: str, metrics: dict[str, str], columns: int = 2,
                color: str | None = None, height: int = 180) -> int:
    """One small line chart per metric present in `df` (metrics differ in scale); returns how many."""
    present = [(c, t) for c, t in metrics.items() if c in df.columns and df[c].notna().any()]
    if not present or x not in df.columns:
        return 0
    cols = st.columns(min(columns, len(present)))
    for i, (col, title) in enumerate(present):
        keep = [x, col] + ([color] if color and color in df.columns else [])
        data = df[keep].dropna(subset=[x, col])
        if color and color in data.columns:  # thin each coloured line on its own, so none vanishes
            data = pd.concat([thin(g) for _, g in data.groupby(color, sort=False)]) if len(data) else data
        else:
            data = thin(data)
        enc = {
            "x": alt.X(f"{x}:Q", title=x_title),
            "y": alt.Y(f"{col}:Q", title=title, scale=alt.Scale(zero=False)),
            "tooltip": [alt.Tooltip(f"{x}:Q", title=x_title, format=",.4~g"),
                        alt.Tooltip(f"{col}:Q", title=title, format=",.4~g")],
        }
        if color and color in data.columns:
            enc["color"] = alt.Color(f"{color}:N", title=color)
        chart = (alt.Chart(data, title=title).mark_line(point=len(data) < 3).encode(**enc)
                 .properties(height=height))
        cols[i % len(cols)].altair_chart(chart, width="stretch")
    return len(present)


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """A job's progress points as a frame with `elapsed_s` since its first point."""
    if not history:
        return pd.DataFrame()
    df = pd.DataFrame(history)
    if "t" in df.columns:
        df["elapsed_s"] = df["t"] - df["t"].min()
    if "step" in df.columns:
        df["step"] = df["step"].fillna("").astype(str)
    return df


def job_charts(history: list[dict[str, Any]]) -> None:
    """Live charts over a job's whole history: training metrics, discovery heap, throughput."""
    df = history_frame(history)
    if df.empty or "elapsed_s" not in df.columns:
        st.caption("No progress points yet.")
        return
    drawn = 0
    train = df[df["loss"].notna()] if "loss" in df.columns else df.iloc[0:0]
    if not train.empty:
        st.markdown("**Training**")
        drawn += line_charts(train, "elapsed_s", "time (s)", TRAIN_METRICS)
    disc = df[df[[c for c in DISCOVER_METRICS if c in df.columns]].notna().any(axis=1)] \
        if any(c in df.columns for c in DISCOVER_METRICS) else df.iloc[0:0]
    if not disc.empty:
        st.markdown("**Discovery**")
        drawn += line_charts(disc, "elapsed_s", "time (s)", DISCOVER_METRICS)
    if "samples_per_s" in df.columns and df["samples_per_s"].notna().any():
        st.markdown("**Throughput**")
        drawn += line_charts(df, "elapsed_s", "time (s)", {"samples_per_s": "samples / s"}, columns=1,
                             color="step" if "step" in df.columns and (df["step"] != "").any() else None)
    if not drawn:
        st.caption("No metrics to chart yet.")
