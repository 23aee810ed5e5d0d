"""``mmedge bench --plot``: the measured figures of each artifact side by side, one named axis per quantity.

Panels: latency, throughput, peak resident memory, size, and one panel per fidelity metric the artifacts' manifests
hold (CLIP's zero-shot top-1 agreement and a captioner's share of greedy captions identical to FP32 are different
measures, so they never share an axis); FP32 is the reference those are measured against, drawn as a line at 1,
not as a bar of its own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mmedge.bench import artifact_name
from mmedge.errors import InputError, MmedgeError

FIDELITY_TITLES = {
    "top1_agreement": "zero-shot top-1 agreement with FP32",
    "greedy_identical_share": "greedy captions identical to FP32",
}
PLOT_FORMATS = ("png", "svg", "pdf")  # what --plot writes, by the file's suffix
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def require_matplotlib():
    """matplotlib.pyplot (on the Agg backend), or an MmedgeError naming the install command."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MmedgeError("--plot needs matplotlib, which is not installed", "matplotlib importable",
                          'pip install "mmedge[plot]" (or drop --plot)') from None
    return plt


def check_plot_path(out: str) -> None:
    """Refuse, before any measuring, a --plot path the plot cannot be written to: one with a suffix naming no format
    it writes, a folder, or a file in a folder that does not exist or that this user cannot write."""
    path = Path(out)
    folder = path.parent
    if path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise InputError(f"--plot '{out}' names no format mmedge bench writes",
                         f"a file name ending in {', '.join('.' + f for f in PLOT_FORMATS)}",
                         f"pass e.g. --plot {path.with_suffix('.png').name}")
    if path.is_dir():
        raise InputError(f"--plot '{out}' is a folder", "the path of a file to write the plot to",
                         f"pass e.g. --plot {path / 'bench.png'}")
    existing = next(f for f in (folder, *folder.parents) if f.exists() or f == Path(f.anchor or "."))
    if not existing.is_dir():
        raise InputError(f"--plot '{out}' is under '{existing}', which is not a folder", "a file in a folder",
                         "pass a path in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # the plot's folder, or the nearest one to make it in
        raise InputError(f"--plot '{out}' is under '{existing}', which this user cannot write",
                         "a file in a writable folder", "pass a path in a folder you can write to")


def _backends(result: dict) -> str:
    """"onnxruntime [cpu]", "torch (torch.dtype=bf16)": where a result's components ran, with the settings given."""
    settings = [f"{name}.{key}={value}" for name, chosen in (result.get("backend_options") or {}).items()
                for key, value in chosen.items()]
    ran = ", ".join(sorted({str(v) for v in result["backend"].values()}))
    return ran + (f" ({', '.join(settings)})" if settings else "")


def _name(result: dict) -> str:
    return f"{artifact_name(result['artifact'])}\n{result['precision']}"


def _panels(results: list[dict]) -> list[tuple[str, list[dict], list[float], str]]:
    """(title, the results drawn, their values, label format) per panel."""
    runs = {r["latency_ms"].get("calls", r["runs"]) for r in results}
    units = sorted({r["throughput"]["unit"] for r in results})
    panels = [
        (f"latency, ms (median of {'/'.join(map(str, sorted(runs)))} calls, batch 1)", results,
         [r["latency_ms"]["median"] for r in results], "{:.1f}"),
        (f"throughput, {' or '.join(units)} per second (batch {results[0]['batch']})", results,
         [r["throughput"]["per_second"] for r in results], "{:.1f}"),
        ("peak resident memory, MiB", results, [(r["memory"]["peak_rss_bytes"] or 0) / 2**20 for r in results],
         "{:.0f}"),
        ("size of the files the plan loads, MB", results, [r["size_bytes"] / 1e6 for r in results], "{:.2f}"),
    ]
    for metric, title in FIDELITY_TITLES.items():
        measured = [r for r in results if r["fidelity"]["metric"] == metric and r["fidelity"]["value"] is not None]
        if measured:
            panels.append((f"{title}\n(held-out images, measured at export)", measured,
                           [r["fidelity"]["value"] for r in measured], "{:.3f}"))
    return panels


def figure(results: list[dict]):
    """The matplotlib Figure of ``results`` (``mmedge.bench.measure`` dicts)."""
    plt = require_matplotlib()
    panels = _panels(results)
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 + 1.2 * len(results) * columns, 3.4 * rows), squeeze=False)
    colors = {r["artifact"]: COLORS[i % len(COLORS)] for i, r in enumerate(results)}
    for axis, (title, drawn, values, fmt) in zip(axes.flat, panels):
        bars = axis.bar(range(len(values)), values, color=[colors[r["artifact"]] for r in drawn])
        axis.set_title(title, fontsize=9)
        axis.set_xticks(range(len(values)), [_name(r) for r in drawn], fontsize=7)
        for bar, value in zip(bars, values):
            axis.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                          va="bottom", fontsize=7)
        if "FP32" in title:
            axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="FP32 (reference)")
            axis.set_ylim(0, 1.12)
            axis.legend(fontsize=7, loc="lower right")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    fig.suptitle("mmedge bench: " + ", ".join(sorted({_backends(r) for r in results})), fontsize=9)
    fig.tight_layout()
    return fig


def plot(results: list[dict], out: str) -> Path:
    """Save :func:`figure` as ``out`` (PNG, SVG or PDF by its suffix), whole or not at all: it is drawn into a
    temporary file in the same folder, then renamed into place (``out`` as it was, or absent, if that fails)."""
    plt = require_matplotlib()
    fig = figure(results)
    out_path = Path(out)
    temporary = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)  # checked before measuring: made in a writable folder
        fig.savefig(temporary, dpi=120, format=out_path.suffix.lower().lstrip("."))
        os.replace(temporary, out_path)
    except OSError as exc:
        raise MmedgeError(f"writing the plot '{out}' failed ({exc.strerror or exc})",
                          "a folder with room for it that this user can write",
                          "free some space, or pass --plot a path in another folder") from None
    finally:
        plt.close(fig)
        temporary.unlink(missing_ok=True)
    return out_path
