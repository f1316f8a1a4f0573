"""The evaluation report: results.json, a markdown table, and one self-contained HTML page.

`results` (also the content of results.json):

  encoders: `[{"name", "kind", "path"}]` in table column order.
  tasks: `{task_key: {"metric", "chance", "majority", "description"}}`; insertion order is row
    order of the tables (a row per task column, a column per encoder).
  values: `{encoder_name: {task_key: ProbeResult.to_json()}}`, a cell optionally with "spread"
    (std over seeds) and "n" (number of seeds).
  meta: free-form (config summary, date, command).

`visuals` (HTML only): `{encoder_name: [{"title", "frames": uint8 [T, H, W, 3],
"pca": float32 [T', gh, gw, 3] in [0, 1]}]}`, e.g. from `pca_rgb`; T' may be T divided by the
temporal patch size.

The HTML page has no external reference: CSS is inline and every plot is a base64 PNG drawn by
matplotlib's Agg canvas (no pyplot, so no global backend and no display is needed).
"""

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from univit_jax import atomic

_MAX_FRAMES = 4
# Confusion matrices up to this many classes get their cells annotated and every tick labelled.
_ANNOTATE_CLASSES = 12
_LABEL_CLASSES = 40

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1160px; margin: 24px auto; padding: 0 16px; line-height: 1.4; }
h1 { margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { margin: 20px 0 8px; } h4 { margin: 12px 0 4px; font-size: 14px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 10px; }
th { background: #f2f4f7; vertical-align: bottom; }
tbody th { text-align: left; }
#results td.value { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#results td.missing { text-align: center; color: #999; }
#results tfoot td { color: #666; font-style: italic; }
.metric { display: block; font-weight: normal; color: #666; font-size: 12px; }
.kind { color: #666; font-size: 12px; }
table.meta td:first-child { font-weight: 600; white-space: nowrap; }
table.meta td { vertical-align: top; }
code { font-size: 12px; white-space: pre-wrap; word-break: break-all; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 640px; }
img { max-width: 100%; }
dl.tasks dt { font-weight: 600; } dl.tasks dd { margin: 0 0 6px 16px; color: #444; }
"""


def pca_basis(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The mean and first 3 principal directions of `tokens [K, D]`.

  Each direction's sign is fixed so that its largest-magnitude loading is positive, so the same
  tokens always get the same colours.

  Returns:
    `mean [D]` and `components [3, D]` (unit rows, by decreasing variance), float64.

  Raises:
    ValueError: if `tokens` is not 2-D or has fewer than 3 rows or columns.
  """
  tokens = np.asarray(tokens, np.float64)
  if tokens.ndim != 2 or min(tokens.shape) < 3:
    raise ValueError(f"pca_basis needs [K >= 3, D >= 3] tokens, got {tokens.shape}")
  mean = tokens.mean(0)
  centered = tokens - mean
  # Eigen-decomposition of the D x D scatter: cheaper than an SVD when K (tokens) >> D.
  _, vectors = np.linalg.eigh(centered.T @ centered)
  components = vectors[:, ::-1][:, :3].T
  largest = np.argmax(np.abs(components), axis=1)
  components *= np.sign(components[np.arange(3), largest])[:, None]
  return mean, components


def pca_rgb(tokens: np.ndarray, grid: tuple[int, int, int],
            basis: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """Colours the patch tokens of one image or clip by their first 3 principal components.

  Each component is mapped to [0, 1] by its 1st-99th percentile range over these tokens (values
  outside are clipped), so a few outlier tokens do not wash out the map.

  Args:
    tokens: `[M, D]` patch tokens, M = T * gh * gw in (t, h, w) order.
    grid: the token grid `(T, gh, gw)`.
    basis: `(mean, components)` from `pca_basis`, to colour several clips in one basis (the
      percentile range is still this clip's own); by default the basis is fitted on `tokens`.

  Returns:
    float32 `[T, gh, gw, 3]` in [0, 1].

  Raises:
    ValueError: if M does not match the grid.
  """
  tokens = np.asarray(tokens, np.float64)
  if tokens.ndim != 2 or tokens.shape[0] != int(np.prod(grid)):
    raise ValueError(f"pca_rgb: tokens {tokens.shape} do not fill the grid {tuple(grid)}")
  mean, components = pca_basis(tokens) if basis is None else basis
  projected = (tokens - mean) @ components.T
  low, high = np.percentile(projected, [1, 99], axis=0)
  rgb = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
  return rgb.reshape(*grid, 3).astype(np.float32)


def _format_cell(cell: Mapping[str, Any] | None) -> str:
  if cell is None:
    return "-"
  if "spread" in cell:
    return f"{cell['value']:.3f} ± {cell['spread']:.3f}"
  return f"{cell['value']:.3f}"


def _markdown_escape(text: str) -> str:
  return str(text).replace("|", "\\|")


def markdown_table(results: Mapping[str, Any]) -> str:
  """The results as a markdown table: a row per task column ("<task>/<probe>", its metric and
  chance level), a column per encoder (many probes, few encoders: this way it stays readable).

  A cell reads "0.512", "0.512 ± 0.010" when the cell has a "spread" over seeds, or "-" when the
  encoder was not evaluated on the task.
  """
  tasks, values = results["tasks"], results["values"]
  names = [encoder["name"] for encoder in results["encoders"]]
  lines = ["| " + " | ".join(map(_markdown_escape, ["task / probe", "metric", "chance",
                                                     "majority"] + names))
           + " |", "|---|---|---:|---:|" + "---:|" * len(names)]
  for key, task in tasks.items():
    chance, majority = ("-" if task.get(k) is None else f"{task[k]:.3f}"
                        for k in ("chance", "majority"))
    row = [key, task["metric"], chance, majority] + [
      _format_cell(values.get(name, {}).get(key)) for name in names]
    lines.append("| " + " | ".join(map(_markdown_escape, row)) + " |")
  return "\n".join(lines) + "\n"


def _png_uri(figure: Figure) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_curves(curves: Mapping[str, Sequence], title: str) -> Figure | None:
  """One subplot per non-empty curve: a list of numbers (against its index) or of [x, y] pairs."""
  named = [(name, np.asarray(points, np.float64)) for name, points in curves.items() if points]
  if not named:
    return None
  figure = Figure(figsize=(3.4 * len(named), 2.6))
  for i, (name, points) in enumerate(named):
    axes = figure.add_subplot(1, len(named), i + 1)
    if points.ndim == 2:
      x, y = points[:, 0], points[:, 1]
      axes.plot(x, y, marker="o", markersize=3)
      # Hyper-parameter sweeps (l2, learning rate) span decades.
      if np.all(x > 0) and x.max() / x.min() >= 100:
        axes.set_xscale("log")
    else:
      axes.plot(np.arange(len(points)), points, marker="o" if len(points) <= 30 else None,
                markersize=3)
    axes.set_title(name, fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  return figure


def _plot_confusion(confusion: Sequence[Sequence[float]], class_names: Sequence[str] | None,
                    title: str) -> Figure:
  """Row-normalised confusion matrix (row: true class), annotated with counts when small."""
  counts = np.asarray(confusion, np.float64)
  num_classes = len(counts)
  rows = counts.sum(1, keepdims=True)
  recall = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
  size = min(2.5 + 0.4 * num_classes, 9.0)
  figure = Figure(figsize=(size + 1.0, size))
  axes = figure.add_subplot()
  image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  if num_classes <= _LABEL_CLASSES:
    axes.set_xticks(range(num_classes), names, rotation=90, fontsize=8)
    axes.set_yticks(range(num_classes), names, fontsize=8)
  if num_classes <= _ANNOTATE_CLASSES:
    for (i, j), count in np.ndenumerate(counts):
      axes.text(j, i, f"{count:g}", ha="center", va="center", fontsize=7,
                color="white" if recall[i, j] > 0.5 else "black")
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  axes.set_title(title, fontsize=10)
  return figure


def _upsample_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
  rows = np.arange(height) * image.shape[0] // height
  cols = np.arange(width) * image.shape[1] // width
  return image[rows][:, cols]


def _plot_feature_map(frames: np.ndarray, pca: np.ndarray) -> Figure:
  """Up to 4 evenly spaced frames, each with its PCA colour map (nearest-upsampled) beside it."""
  num_frames, height, width = frames.shape[:3]
  picked = np.unique(np.linspace(0, num_frames - 1, min(num_frames, _MAX_FRAMES)).round()
                     .astype(int))
  aspect = width / height
  figure = Figure(figsize=(2 * len(picked) * 2.0 * aspect, 2.3))
  for i, t in enumerate(picked):
    # A tubelet covers several frames: frame t falls in token slice t * T' // T.
    colours = _upsample_nearest(pca[t * len(pca) // num_frames], height, width)
    for j, (image, label) in enumerate(((frames[t], f"frame {t}"), (colours, "PCA"))):
      axes = figure.add_subplot(1, 2 * len(picked), 2 * i + j + 1)
      axes.imshow(image, interpolation="nearest")
      axes.set_title(label, fontsize=9)
      axes.set_axis_off()
  figure.tight_layout()
  return figure


def _esc(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _meta_html(meta: Mapping[str, Any]) -> str:
  rows = []
  for key, value in meta.items():
    text = value if isinstance(value, str) else json.dumps(value, indent=1, default=str)
    rows.append(f"<tr><td>{_esc(key)}</td><td><code>{_esc(text)}</code></td></tr>")
  return f'<table class="meta">{"".join(rows)}</table>' if rows else ""


def _selected_text(selected: Mapping[str, Any]) -> str:
  return ", ".join(f"{key}={value}" for key, value in selected.items())


def _cell_tooltip(cell: Mapping[str, Any]) -> str:
  parts = [_selected_text(cell["selected"])] if cell.get("selected") else []
  if cell.get("val_value") is not None:
    parts.append(f"val {cell['val_value']:.3f}")
  if "n" in cell:
    parts.append(f"n={cell['n']}")
  return "; ".join(parts)


def _results_html(results: Mapping[str, Any]) -> str:
  tasks, values = results["tasks"], results["values"]
  head = "".join(f'<th title="{_esc(encoder.get("path") or "")}">{_esc(encoder["name"])}'
                 f' <span class="kind">{_esc(encoder.get("kind", ""))}</span></th>'
                 for encoder in results["encoders"])
  body = []
  for key, task in tasks.items():
    chance, majority = ("" if task.get(k) is None else f"{task[k]:.3f}"
                        for k in ("chance", "majority"))
    row = [f'<th>{_esc(key)}<span class="metric">{_esc(task["metric"])}</span></th>',
           f'<td class="chance">{chance}</td>', f'<td class="chance">{majority}</td>']
    for encoder in results["encoders"]:
      cell = values.get(encoder["name"], {}).get(key)
      if cell is None:
        row.append('<td class="missing">-</td>')
      else:
        row.append(f'<td class="value" title="{_esc(_cell_tooltip(cell))}">'
                   f"{_esc(_format_cell(cell))}</td>")
    body.append(f"<tr>{''.join(row)}</tr>")
  return (f'<table id="results"><thead><tr><th>task / probe</th><th>chance</th>'
          f'<th>majority</th>{head}</tr>'
          f"</thead><tbody>{''.join(body)}</tbody></table>")


def _tasks_html(tasks: Mapping[str, Any]) -> str:
  items = [f"<dt>{_esc(key)}</dt><dd>{_esc(task['description'])}</dd>"
           for key, task in tasks.items() if task.get("description")]
  return f'<dl class="tasks">{"".join(items)}</dl>' if items else ""


def _figure_html(figure: Figure, caption: str) -> str:
  return (f'<figure><img src="{_png_uri(figure)}" alt="{_esc(caption)}">'
          f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _probes_html(results: Mapping[str, Any]) -> str:
  sections = []
  for encoder in results["encoders"]:
    figures = []
    for key, cell in results["values"].get(encoder["name"], {}).items():
      summary = f"{key}: {cell['metric']} {_format_cell(cell)}"
      if cell.get("selected"):
        summary += f"; selected {_selected_text(cell['selected'])}"
      curves = _plot_curves(cell.get("curves", {}), key)
      if curves is not None:
        figures.append(_figure_html(curves, summary))
      details = cell.get("details", {})
      if "confusion" in details:
        figures.append(_figure_html(
          _plot_confusion(details["confusion"], details.get("class_names"), f"{key} confusion"),
          f"{key}: confusion matrix (colour: row-normalised; numbers: counts)"))
    if figures:
      sections.append(f"<h3>{_esc(encoder['name'])}</h3>"
                      f'<div class="figures">{"".join(figures)}</div>')
  return "".join(sections)


def _visuals_html(visuals: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  sections = []
  for name, items in visuals.items():
    figures = [
      _figure_html(_plot_feature_map(np.asarray(item["frames"]), np.asarray(item["pca"])),
                   item["title"])
      for item in items]
    sections.append(f"<h3>{_esc(name)}</h3>{''.join(figures)}")
  return "".join(sections)


def _render_html(results: Mapping[str, Any],
                visuals: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> str:
  """The report as one self-contained HTML page (see the module docstring)."""
  title = "UniViT evaluation"
  parts = [
    f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
    f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>",
    _meta_html(results.get("meta", {})),
    "<h2>Results</h2>", _results_html(results), _tasks_html(results["tasks"]),
  ]
  probes = _probes_html(results)
  if probes:
    parts += ["<h2>Probes</h2>", probes]
  if visuals:
    parts += ["<h2>Feature maps</h2>", _visuals_html(visuals)]
  parts.append("</body></html>\n")
  return "\n".join(parts)


def write_report(out_dir: str, results: Mapping[str, Any],
                 visuals: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                 ) -> dict[str, str]:
  """Writes results.json, results.md and report.html into `out_dir`, each atomically.

  results.json keeps the key order of `results` (tasks' order is the column order), so it is
  written unsorted rather than through `atomic.write_json`.

  Returns:
    The paths written, under the keys "json", "markdown" and "html".

  Raises:
    TypeError: if `results` holds a value JSON cannot encode (nothing is written then).
  """
  paths = {"json": os.path.join(out_dir, "results.json"),
           "markdown": os.path.join(out_dir, "results.md"),
           "html": os.path.join(out_dir, "report.html")}
  encoded = json.dumps(results, indent=2).encode()
  page = _render_html(results, visuals)
  atomic.write_bytes(paths["json"], encoded + b"\n")
  atomic.write_bytes(paths["markdown"], markdown_table(results).encode())
  atomic.write_bytes(paths["html"], page.encode())
  return paths
