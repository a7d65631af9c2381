"""PNG charts of a report (the ``charts`` extra: matplotlib): speedup bars per paradigm,
per-position acceptance curves and, when the records span several batch sizes, speedup
and tokens/s against the batch size; drawn from the same records as the tables."""

from __future__ import annotations

import importlib
import io
from typing import Any, Sequence

from pytest_specdec.reporting.layout import (Column, batch_of, column_of, columns_of, engine_of,
                                             shows_engine,
                                             group_by_target, report_order, row_key, row_keys,
                                             shows_temperature)
from pytest_specdec.reporting.load import ReportError

#: Chart files, ``<stem><suffix>``, written only when asked for (``--charts``), with
#: their titles, in the order they are written and shown; the batch chart only when the
#: records span more than one batch size.
CHART_TITLES = {"-speedup.png": "Speedup per paradigm",
                "-acceptance.png": "Per-position acceptance",
                "-batch.png": "Speedup and tokens/s per batch size"}
CHART_SUFFIXES = tuple(CHART_TITLES)
CHARTS_EXTRA = "pip install pytest-specdec[charts]"


def require_matplotlib() -> None:
    """Raise ReportError naming the ``charts`` extra when matplotlib cannot be imported."""
    _matplotlib()


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas: no pyplot, so no global backend, no window."""
    try:
        importlib.import_module("matplotlib")  # first: a missing package fails here
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"charts need matplotlib, which cannot be imported ({exc}); "
                          f"install the charts extra: {CHARTS_EXTRA}") from None
    return Figure, FigureCanvasAgg


def render_charts(records: Sequence[dict]) -> dict[str, bytes]:
    """PNG bytes by file suffix (CHART_SUFFIXES): speedup bars and acceptance curves,
    and the batch-size chart when the records hold more than one batch size."""
    figure_class, canvas_class = _matplotlib()
    figures = dict(zip(CHART_SUFFIXES, (_speedup_figure(records, figure_class),
                                        _acceptance_figure(records, figure_class))))
    if len({batch_of(r) for r in records}) > 1:
        figures["-batch.png"] = _batch_figure(records, figure_class)
    pngs = {}
    for suffix, figure in figures.items():
        canvas_class(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        pngs[suffix] = buffer.getvalue()
    return pngs


def _speedup_figure(records: Sequence[dict], figure_class: Any) -> Any:
    """Per target: drafters along x, one bar per paradigm × temperature, baseline at 1."""
    groups = group_by_target(records)
    widest = max(len(row_keys(group)) * max(len(columns_of(group)), 1) for group in groups.values())
    figure = figure_class(figsize=(max(6.0, 0.45 * widest + 2) + 2.0, 3.8 * len(groups)),
                          layout="constrained")
    axes = figure.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (label, group) in zip(axes, groups.items()):
        columns = columns_of(group)
        with_temperature = shows_temperature(group)
        rows = [row for row in row_keys(group) if row[0] != "baseline"]
        by_cell = {(row_key(r), column_of(r)): r for r in group}
        width = 0.8 / max(len(columns), 1)
        for j, column in enumerate(columns):
            xs, heights = [], []
            for i, row in enumerate(rows):
                record = by_cell.get((row, column))
                if record is not None and record["speedup"] is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    heights.append(record["speedup"])
            ax.bar(xs, heights, width, label=column.header(with_temperature=with_temperature,
                                                        with_engine=shows_engine(group)))
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="baseline")
        ax.set_xticks(range(len(rows)), [row[1] for row in rows], rotation=30, ha="right")
        ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
        ax.set_ylabel("speedup over baseline (x)")
        ax.set_title(f"Speedup: {label}")
        # beside the axes, never over a bar or a curve
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0)
    return figure


def _acceptance_figure(records: Sequence[dict], figure_class: Any) -> Any:
    """One panel per target and paradigm × temperature; a curve per speculative drafter."""
    panels: dict[str, list[dict]] = {}
    several_targets = len(group_by_target(records)) > 1
    for label, group in group_by_target(records).items():
        with_temperature = shows_temperature(group)
        for column in columns_of(group):
            curves = [r for r in report_order(group) if r["role"] == "speculative"
                      and column_of(r) == column and r["per_position_acceptance"]]
            if curves:
                name = column.header(with_temperature=with_temperature,
                                     with_engine=shows_engine(group))
                panels[f"{label}, {name}" if several_targets else name] = curves
    count = max(len(panels), 1)
    figure = figure_class(figsize=(8.0, 3.6 * count), layout="constrained")
    axes = figure.subplots(count, 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no per-position acceptance in these records",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (name, curves) in zip(axes, panels.items()):
        for record in curves:
            rates = record["per_position_acceptance"]
            ax.plot(range(1, len(rates) + 1), [rate * 100 for rate in rates], marker="o",
                    markersize=3, label=record["drafter"])
        longest = max(len(record["per_position_acceptance"]) for record in curves)
        ax.set_xticks(range(1, longest + 1, max(1, -(-longest // 16))))  # whole positions
        ax.set_ylim(0, 100)
        ax.set_xlabel("draft position")
        ax.set_ylabel("accepted (%)")
        ax.set_title(f"Per-position acceptance: {name}")
        # beside the axes, never over a bar or a curve
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0)
    return figure


def _batch_panels(records: Sequence[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """Per target and paradigm × temperature run at more than one batch size: each
    drafter's records by batch size (baseline first; peers run at batch 1 only)."""
    panels: dict[str, dict[str, dict[int, dict]]] = {}
    several_targets = len(group_by_target(records)) > 1
    for label, group in group_by_target(records).items():
        with_temperature = shows_temperature(group)
        by_column: dict[Column, dict[str, dict[int, dict]]] = {}
        for r in report_order(group):
            if r["role"] != "peer":
                column = Column(r["paradigm"], float(r["temperature"]), engine=engine_of(r))
                by_column.setdefault(column, {}).setdefault(r["drafter"], {})[batch_of(r)] = r
        for column, drafters in by_column.items():
            if len({b for sizes in drafters.values() for b in sizes}) > 1:
                name = column.header(with_temperature=with_temperature,
                                     with_engine=shows_engine(group))
                panels[f"{label}, {name}" if several_targets else name] = drafters
    return panels


def _batch_figure(records: Sequence[dict], figure_class: Any) -> Any:
    """Per target and paradigm × temperature, two panels against the batch size: the
    speedup over plain decoding at the same size (a line per speculative drafter,
    baseline at 1) and tokens/s of the whole run (baseline included); one color per
    drafter across the figure, the legend beside the panels."""
    panels = _batch_panels(records)
    count = max(len(panels), 1)
    figure = figure_class(figsize=(12.0, 3.9 * count), layout="constrained")
    # a subfigure per row: its name spans both panels, however long the target's name
    rows = figure.subfigures(count, 1, squeeze=False)[:, 0]
    axes = [row.subplots(1, 2) for row in rows]
    drafters = list(dict.fromkeys(d for lines in panels.values() for d in lines
                                  if d != "baseline"))  # the baseline: dashed grey
    colors = {d: f"C{i % 10}" for i, d in enumerate(drafters)}
    for row, (speed_ax, rate_ax), (name, lines) in zip(rows, axes, panels.items()):
        row.suptitle(name)
        sizes = sorted({b for by_size in lines.values() for b in by_size})
        for drafter, by_size in lines.items():
            points = sorted(by_size.items())
            style = {"color": colors.get(drafter, "0.4"), "marker": "o", "markersize": 4,
                     "label": drafter, "linestyle": "--" if drafter == "baseline" else "-"}
            rates = [(b, r["tokens_per_s"]) for b, r in points if r.get("tokens_per_s") is not None]
            if rates:
                rate_ax.plot(*zip(*rates), **style)
            if drafter != "baseline":
                speeds = [(b, r["speedup"]) for b, r in points if r.get("speedup") is not None]
                if speeds:
                    speed_ax.plot(*zip(*speeds), **style)
        speed_ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
        for ax, ylabel, title in ((speed_ax, "speedup over baseline (x)",
                                   "Speedup over plain decoding at each size"),
                                  (rate_ax, "tokens/s", "Tokens/s of the whole run")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize="medium")
        rate_ax.set_ylim(bottom=0)
        # one legend per row, beside the panels, never over a line
        rate_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0)
    if not panels:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][0].text(0.5, 0.5, "no case ran at more than one batch size",
                        ha="center", va="center", transform=axes[0][0].transAxes)
    return figure


#: Chart files, ``<stem><suffix>``, written only when asked for (``--charts``).
