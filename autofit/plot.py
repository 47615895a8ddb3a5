"""PNG plots: memory over one training step, and peak memory vs batch size.

matplotlib is an optional extra (``pip install 'autofit[plot]'``). It is imported inside the
functions, through the object-oriented API on the Agg canvas (pyplot's global backend is
never touched), and a missing install raises ``ImportError`` with the install hint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autofit.units import format_binary

INSTALL_HINT = "matplotlib not installed (pip install 'autofit[plot]')"

PHASE_COLORS = {
    "setup": "#bbbbbb",
    "data": "#8c564b",
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "optimizer": "#2ca02c",
    "zero_grad": "#9467bd",
}
PHASE_SHORT = {"setup": "setup", "data": "data", "forward": "fwd", "backward": "bwd",
               "optimizer": "opt", "zero_grad": "zero"}
OFF_SCALE = 4.0
"""Budget/limit lines more than this many times the peak are named in the title, not drawn."""


def _figure(width: float = 11.0, height: float = 5.5) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _unit(max_bytes: float) -> tuple[float, str]:
    return (2.0**30, "GiB") if max_bytes >= 4 * 2**30 else (2.0**20, "MiB")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _timeline_arrays(profile: Any) -> tuple[list[int], list[int]]:
    timeline = _field(profile, "timeline")
    if isinstance(timeline, dict):  # Profile.to_dict()
        return list(timeline["seq"]), list(timeline["live_bytes"])
    return [p.seq for p in timeline], [p.live_bytes for p in timeline]


def _lines(ax: Any, peak: float, scale: float, unit: str,
           lines: list[tuple[str, Any, str, str]]) -> list[str]:
    """Draw horizontal reference lines within scale; return notes for the ones off scale."""
    off = []
    for label, value, color, style in lines:
        if not value:
            continue
        if value > OFF_SCALE * max(peak, 1):
            off.append(f"{label} {format_binary(value)} off scale")
            continue
        ax.axhline(value / scale, color=color, linestyle=style, linewidth=1.2,
                   label=f"{label} {format_binary(value)}")
    return off


def plot_timeline(profile: Any, path: str | Path, limit_bytes: int | None = None,
                  budget_bytes: int | None = None) -> str:
    """Live memory over the traced step(s) with phase bands, the peak and the budget lines.

    ``profile``: an ``autofit.profile.Profile`` or its ``to_dict()``. Returns "wrote NAME".
    """
    fig, ax = _figure(13.0, 5.5)
    seqs, live = _timeline_arrays(profile)
    traced_peak = _field(profile, "traced_peak_bytes") or (max(live) if live else 0)
    planned = _field(profile, "peak_bytes") or traced_peak
    top = max([traced_peak, planned] + [v for v in (budget_bytes, limit_bytes)
                                        if v and v <= OFF_SCALE * max(traced_peak, 1)])
    scale, unit = _unit(top)
    if seqs:
        xs, ys = [0, *seqs], [0.0, *[v / scale for v in live]]
        ax.step(xs, ys, where="post", color="black", linewidth=1.0, label="live tensor bytes")
        ax.fill_between(xs, ys, step="post", color="black", alpha=0.06)
    x_end = max(seqs) if seqs else 1
    phases = _field(profile, "phases") or []
    seen: set[str] = set()
    from matplotlib.patches import Patch

    for span in phases:
        phase, step = _field(span, "phase"), _field(span, "step")
        start, end = _field(span, "start_seq"), min(_field(span, "end_seq"), x_end)
        if end <= start:
            continue
        color = PHASE_COLORS.get(phase, "#dddddd")
        ax.axvspan(start, end, color=color, alpha=0.18, linewidth=0)
        seen.add(phase)
        if (end - start) >= 0.04 * x_end:
            label = PHASE_SHORT.get(phase, phase) + (f" {step}" if step else "")
            ax.text((start + end) / 2, 0.98, label, transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8, color="black", alpha=0.7)
    peak_seq = _field(profile, "peak_seq")
    breakdown = _field(profile, "breakdown")
    where = ""
    if breakdown is not None:
        where = f" in {_field(breakdown, 'peak_phase')} of step {_field(breakdown, 'peak_step')}"
    if peak_seq is not None and traced_peak:
        ax.plot([peak_seq], [traced_peak / scale], marker="v", color="red", markersize=9,
                linestyle="none", label=f"peak {format_binary(traced_peak)}{where}")
    refs = [("budget", budget_bytes, "red", "--"),
            ("limit (budget x (1 - margin))", limit_bytes, "orange", ":")]
    if _field(profile, "device_kind") == "cuda" and _field(profile, "real"):
        refs[:0] = [("max_memory_allocated", _field(profile, "allocated_bytes"), "gray", "--"),
                    ("max_memory_reserved", _field(profile, "reserved_bytes"), "gray", "-.")]
    elif planned and planned != traced_peak:
        refs.insert(0, ("planned peak (allocator model)", planned, "gray", "-."))
    off = _lines(ax, traced_peak, scale, unit, refs)
    cand = _field(profile, "candidate")
    label = cand.label() if hasattr(cand, "label") else (
        " ".join(f"{k}={v}" for k, v in cand.items()) if isinstance(cand, dict) else "")
    how = "measured" if _field(profile, "real") else "predicted on fake tensors"
    title = f"memory over the training step: {label} ({how}, {_field(profile, 'device_kind')})"
    if off:
        title += "\n" + "; ".join(off)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("event (tensor allocation or free), in order")
    ax.set_ylabel(f"live tensor memory ({unit})")
    ax.set_xlim(0, x_end)
    ax.set_ylim(bottom=0)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=PHASE_COLORS.get(p, "#dddddd"), alpha=0.35, label=p)
                for p in PHASE_COLORS if p in seen]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              borderaxespad=0.0)
    ax.grid(True, axis="y", alpha=0.3)
    written = _save(fig, path)
    return f"wrote {written.name}"


def _setting_key(config: dict[str, Any]) -> str:
    strategy = f"/{config['strategy']}" if config.get("strategy") else ""  # a strategy list
    return (f"{config.get('input_size')}/{config.get('precision')}/"
            f"{config.get('checkpoint_segments')}{strategy}")


@dataclass
class BatchCurvePlot:
    """What the peak-vs-batch plot draws: one setting's predicted line and its evidence."""

    name: str
    setting_key: str
    """``"size/precision/segments"``."""
    intercept_bytes: float
    slope_bytes_per_sample: float
    points: list[tuple[int, int]]
    """Traced (batch, peak bytes)."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """This setting's trials as results.json holds them (config, status, peaks)."""
    best: dict[str, Any] | None = None
    """The chosen (or predicted, ``predicted: True``) config: batch_size, peak_bytes."""
    budget_bytes: int | None = None
    limit_bytes: int | None = None
    margin: float = 0.0
    profiled: tuple[int, int] | None = None
    """(batch, peak bytes) of a profiled step."""

    @classmethod
    def from_results(cls, results: dict[str, Any]) -> BatchCurvePlot:
        """The best setting's curve from a tune's results (the most-tried one without a best).

        Raises ``ValueError`` when the results hold no curve for it.
        """
        curves: dict[str, Any] = results.get("curves") or {}
        best = results.get("best") or None
        trials = [t for t in results.get("trials") or [] if isinstance(t.get("config"), dict)]
        if best:
            key = _setting_key(best)
        elif trials:
            counts: dict[str, int] = {}
            for t in trials:
                counts[_setting_key(t["config"])] = counts.get(_setting_key(t["config"]), 0) + 1
            key = max(counts, key=lambda k: counts[k])
        else:
            key = next(iter(curves), "")
        curve = curves.get(key)
        if curve is None and len(curves) == 1:
            key, curve = next(iter(curves.items()))
        if curve is None:
            raise ValueError(f"no predicted curve for setting {key or '?'} in the results")
        if isinstance(curve.get("curve"), dict):  # MaxBatchEstimate.to_dict(): the line inside
            curve = curve["curve"]
        return cls(
            name=results.get("name") or "experiment", setting_key=key,
            intercept_bytes=float(curve.get("intercept_bytes", 0.0)),
            slope_bytes_per_sample=float(curve.get("slope_bytes_per_sample", 0.0)),
            points=[(int(b), int(v)) for b, v in curve.get("points") or []],
            trials=[t for t in trials if _setting_key(t["config"]) == key], best=best,
            budget_bytes=results.get("budget_bytes") or None,
            limit_bytes=results.get("limit_bytes") or None,
            margin=float(results.get("margin") or 0.0),
        )

    @property
    def limit(self) -> int | None:
        if self.limit_bytes:
            return self.limit_bytes
        return int(self.budget_bytes * (1 - self.margin)) if self.budget_bytes else None

    def x_max(self) -> float:
        """The axis covers what matters: trials, the chosen and profiled batches and where the
        line crosses the budget; boundary traces far above it (the search clamps overshooting
        guesses to the spec's max batch) would squash the plot."""
        focus = [int(t["config"]["batch_size"]) for t in self.trials]
        if self.best:
            focus.append(int(self.best["batch_size"]))
        if self.profiled:
            focus.append(self.profiled[0])
        cap = self.budget_bytes or self.limit
        if not self.best and self.slope_bytes_per_sample > 0 and cap:
            focus.append(int((cap - self.intercept_bytes) / self.slope_bytes_per_sample))
        return max((focus or [b for b, _ in self.points]) + [1]) * 1.2

    def peak_at(self, batch: float) -> float:
        return self.intercept_bytes + self.slope_bytes_per_sample * batch


def _draw_evidence(ax: Any, plot: BatchCurvePlot, x_max: float, scale: float) -> None:
    """Predicted line, traces within the axis, measured fits and OOMs."""
    points = [p for p in plot.points if p[0] <= x_max]
    beyond = len(plot.points) - len(points)
    ax.plot([0, x_max], [plot.intercept_bytes / scale, plot.peak_at(x_max) / scale],
            color="#1f77b4", linewidth=1.5,
            label=f"predicted: {format_binary(plot.intercept_bytes)} + "
                  f"{format_binary(plot.slope_bytes_per_sample)} per sample")
    if points:
        more = f"; {beyond} more beyond the axis" if beyond else ""
        ax.plot([b for b, _ in points], [v / scale for _, v in points], "o", color="#1f77b4",
                markerfacecolor="white", label=f"traced (fake tensors{more})")
    fits = [t for t in plot.trials if t.get("status") == "fits" and t.get("measured_peak_bytes")]
    ooms = [t for t in plot.trials if t.get("status") == "oom"]
    if fits:
        ax.plot([t["config"]["batch_size"] for t in fits],
                [t["measured_peak_bytes"] / scale for t in fits], "o", color="#2ca02c",
                label="measured: fits")
    if ooms:
        ys = [(t.get("measured_peak_bytes") or t.get("predicted_peak_bytes") or plot.limit or 0)
              / scale for t in ooms]
        ax.plot([t["config"]["batch_size"] for t in ooms], ys, "x", color="red", markersize=9,
                markeredgewidth=2, label="measured: out of memory")


def _draw_marks(ax: Any, plot: BatchCurvePlot, scale: float) -> None:
    """The chosen (or predicted) config and the profiled batch."""
    if plot.best:
        b = int(plot.best["batch_size"])
        y = plot.best.get("peak_bytes") or plot.best.get("predicted_peak_bytes") or plot.peak_at(b)
        what = "predicted max batch" if plot.best.get("predicted") else "chosen"
        ax.plot([b], [y / scale], "*", color="gold", markeredgecolor="black", markersize=16,
                label=f"{what}: batch {b} ({format_binary(y)})")
    if plot.profiled:
        b, y = plot.profiled
        ax.plot([b], [y / scale], "D", color="#9467bd", markersize=7,
                label=f"profiled: batch {b} ({format_binary(y)})")


def plot_batch_curve(plot: BatchCurvePlot, path: str | Path) -> str:
    """Peak memory vs batch size for one setting: the predicted line, its trace points, the
    measured trials (fits: dots, OOM: x), the budget and limit lines and the chosen config.
    Returns "wrote NAME"."""
    fig, ax = _figure(9.0, 5.5)
    x_max = plot.x_max()
    values = [v for b, v in plot.points if b <= x_max] + [plot.peak_at(x_max)] + [
        t.get("measured_peak_bytes") or 0 for t in plot.trials]
    peak_top = max(values + [1])
    limit = plot.limit
    top = max([peak_top] + [v for v in (plot.budget_bytes, limit)
                            if v and v <= OFF_SCALE * peak_top])
    scale, unit = _unit(top)
    _draw_evidence(ax, plot, x_max, scale)
    off = _lines(ax, peak_top, scale, unit, [
        ("budget", plot.budget_bytes, "red", "--"),
        (f"limit (budget x (1 - {plot.margin:g}))", limit, "orange", ":"),
    ])
    _draw_marks(ax, plot, scale)
    key = plot.setting_key
    size, precision, segments = key.split("/") if key.count("/") == 2 else (key, "", "")
    detail = (f"input size {size}, " if size not in ("", "0") else "") + precision + (
        f", {segments} checkpoint segments" if segments not in ("", "0") else "")
    ax.set_title(f"{plot.name}: peak memory vs batch size\n{detail}"
                 + ("; " + "; ".join(off) if off else ""), fontsize=10)
    ax.set_xlabel("batch size (per device)")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_xlim(0, x_max)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)
    written = _save(fig, path)
    return f"wrote {written.name}"
