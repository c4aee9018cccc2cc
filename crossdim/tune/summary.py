"""Sweep summary: one row per trial (searched values, status, metric), as CSV, markdown and a plot.

Rows are read from the trials' MLflow child runs (the record that survives a resumed sweep), so a
re-run sweep summarises every trial, including those finished before the interruption.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from pydantic import BaseModel

from crossdim.tune.runs import MODEL_URI_TAG, REASON_TAG, STATUS_TAG, TRIAL_PARAMS_TAG, TRIAL_TAG

UNFINISHED = "unfinished"
STATUS_COLOURS = {"finished": "tab:blue", "stopped_early": "tab:orange", "failed": "tab:red", UNFINISHED: "tab:grey"}


class TrialSummary(BaseModel):
    trial_id: str
    run_id: str
    status: str  # finished | stopped_early | failed | unfinished
    params: dict[str, Any]  # searched dotted field -> value
    metric: float | None = None  # the last reported value of the sweep's metric
    epochs: int = 0  # epochs completed
    reason: str | None = None  # failed: one line
    model_uri: str | None = None


def trial_from_run(run: Any, metric: str) -> TrialSummary:
    tags, metrics = run.data.tags, run.data.metrics
    value = metrics.get(metric)
    return TrialSummary(
        trial_id=tags.get(TRIAL_TAG, ""), run_id=run.info.run_id, status=tags.get(STATUS_TAG, UNFINISHED),
        params=json.loads(tags.get(TRIAL_PARAMS_TAG, "{}")),
        metric=value if value is not None and math.isfinite(value) else None,
        epochs=int(metrics["epoch"]) + 1 if "epoch" in metrics else 0,
        reason=tags.get(REASON_TAG), model_uri=tags.get(MODEL_URI_TAG) or None)


def best_trial(trials: Sequence[TrialSummary], mode: str) -> TrialSummary | None:
    """The best finished trial with a logged model (ties: the lower trial id) (pure).

    Stopped-early trials are not candidates: their model is a partly trained one."""
    candidates = [t for t in trials if t.status == "finished" and t.model_uri and t.metric is not None]
    if not candidates:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(candidates, key=lambda t: (sign * float(t.metric), t.trial_id))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- tables
def rows(trials: Sequence[TrialSummary], fields: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """Flat table rows, ordered by trial id (pure)."""
    out = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        row: dict[str, Any] = {"trial_id": t.trial_id, "status": t.status}
        row.update({f: _cell(t.params.get(f)) for f in fields})
        row.update({metric: "" if t.metric is None else f"{t.metric:.4f}", "epochs": t.epochs,
                    "reason": t.reason or "", "mlflow_run_id": t.run_id})
        out.append(row)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def to_csv(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    if not table:
        return "(no trials)\n"
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        lines.append("| " + " | ".join(str(row[h]).replace("|", "\\|") for h in header) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
def plot(trials: Sequence[TrialSummary], fields: Sequence[str], metric: str, log_fields: Sequence[str] = ()) -> Any:
    """One panel per searched field: the metric of each trial against its value, coloured by status."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fields = list(fields) or ["trial_id"]
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.6), squeeze=False)
    for ax, field in zip(axes[0], fields):
        _panel(ax, trials, field, metric, field in log_fields)
    fig.tight_layout()
    return fig


def _panel(ax: Any, trials: Sequence[TrialSummary], field: str, metric: str, log: bool) -> None:
    values = [t.trial_id if field == "trial_id" else t.params.get(field) for t in trials]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = sorted({_cell(v) for v in values}) if not numeric else []
    for t, v in zip(trials, values):
        x = v if numeric else labels.index(_cell(v))
        y = t.metric if t.metric is not None else 0.0
        ax.scatter([x], [y], c=STATUS_COLOURS.get(t.status, "black"), marker="o" if t.metric is not None else "x",
                   label=t.status)
    if numeric and log:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
    handles = {label: h for h, label in zip(*ax.get_legend_handles_labels())}
    ax.legend(handles.values(), handles.keys(), fontsize=7)
    ax.set_xlabel(field)
    ax.set_ylabel(metric)
