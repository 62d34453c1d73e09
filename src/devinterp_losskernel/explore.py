"""The kernel explorer: one self-contained, offline HTML page to walk a loss kernel.

:func:`explore` writes a single HTML file (Bokeh's JavaScript inlined from its wheel through
``bokeh.resources.INLINE``; thumbnails embedded as ``data:`` URIs; no server, no network):

* the map — the UMAP of d = 1 − R (:func:`~devinterp_losskernel.analysis.umap_embedding`,
  same-label edges removed) or an embedding you give, drawn with Bokeh's WebGL backend
  (``output_backend="webgl"``; Bokeh falls back to a 2D canvas where WebGL is missing);
* hover (Bokeh's HoverTool): the thumbnail (image, text / token sequence, or an (a, b) pair),
  label, WordNet path, K(x, x), mean loss over the draws;
* click (Bokeh's TapTool, then our JavaScript — Bokeh has no hook for it): the sample's top-k
  most correlated inputs (toggle: least correlated) as a strip of thumbnails with their R,
  lines drawn to them on the map, and an option to hide same-label neighbours (Appendix B);
* colour by label, hierarchy position (the continuous colouring of Fig. 1A), K(x, x), the
  mean loss, the loss at w* or any score given, with a legend;
* search a label or a WordNet node: its members are ringed on the map.

Only the top-k neighbour lists are shipped (indices and R per sample, for each of the four
variants most/least × all/different-label), never the n × n kernel. R is stored as int16
(R · 32767, rounded; error ≤ 1.6e-5), indices as uint16 when n ≤ 65,536 else int32.
:func:`read_explorer` reads a page's data back (the tests use it).

Bokeh is imported only here, so ``import devinterp_losskernel`` does not load it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import numbers
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["ExplorerPage", "explore", "read_explorer"]

_R_SCALE = 32767.0
_DATA_ID = "lk-data"
_CATEGORY10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


class ExplorerPage(str):
    """The path of a written explorer page (a ``str``), shown inline by Jupyter / Colab.

    ``_repr_html_`` returns the page in an ``<iframe srcdoc=…>``, so the notebook output is
    as self-contained as the file. ``height`` (px) sets the iframe's height.
    """

    height: int = 820

    def __new__(cls, path: Union[str, Path], height: int = 820):
        page = super().__new__(cls, str(path))
        page.height = height
        return page

    def __fspath__(self) -> str:
        return str(self)

    @property
    def path(self) -> Path:
        return Path(str(self))

    def _repr_html_(self) -> str:
        content = Path(str(self)).read_text(encoding="utf-8")
        return (f'<iframe srcdoc="{html.escape(content, quote=True)}" '
                f'style="width:100%;height:{int(self.height)}px;border:0" '
                f'sandbox="allow-scripts allow-same-origin"></iframe>')


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _per_sample(value: Any, n: int, name: str, dtype=np.float64) -> np.ndarray:
    arr = _numpy(value)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one value per probe sample, shape ({n},), got {arr.shape}")
    return arr.astype(dtype)


def _hex(rgba: np.ndarray) -> list:
    rgb = np.clip(np.round(np.asarray(rgba)[:, :3] * 255), 0, 255).astype(int)
    return ["#%02x%02x%02x" % tuple(c) for c in rgb]


def _palette(m: int) -> list:
    if m <= 10:
        return _CATEGORY10[:m]
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if m <= 20 else None
    if cmap is not None:
        return _hex(cmap(np.arange(m) / 20.0 + 1e-9))
    # many classes: golden-ratio hues, alternating lightness, so neighbours in order differ
    import colorsys

    out = []
    for i in range(m):
        h = (i * 0.618033988749895) % 1.0
        l, s = (0.45, 0.75) if i % 2 == 0 else (0.62, 0.65)
        out.append("#%02x%02x%02x" % tuple(int(round(c * 255)) for c in colorsys.hls_to_rgb(h, l, s)))
    return out


def _continuous(values: np.ndarray, cmap: str = "viridis") -> tuple:
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 1.0)
    t = np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)
    colours = _hex(colormaps[cmap](np.where(finite, t, 0.0)))
    colours = [c if f else "#bbbbbb" for c, f in zip(colours, finite)]
    stops = _hex(colormaps[cmap](np.linspace(0, 1, 9)))
    return colours, {"kind": "continuous", "min": lo, "max": hi, "stops": stops}


def _thumbnail_uris(images: Any, n: int, size: int, fmt: str) -> list:
    """One ``data:image/…;base64`` URI per image, the longer side scaled to ``size`` px."""
    from PIL import Image

    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        pil = list(images)
        if len(pil) != n:
            raise ValueError(f"images must have one image per probe sample ({n}), got {len(pil)}")
    else:
        arr = _numpy(images)
        if arr.shape[0] != n or arr.ndim not in (3, 4):
            raise ValueError(f"images must be [n, H, W], [n, H, W, C] or [n, C, H, W] with n={n}, "
                             f"got shape {arr.shape}")
        if arr.ndim == 4 and arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 1, -1)  # channels first → last
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            a = arr.astype(np.float64)
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            if lo >= 0.0 and hi <= 1.0:
                lo, hi = 0.0, 1.0
            arr = np.clip(np.round((a - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
        pil = [Image.fromarray(a) for a in arr]
    uris = []
    for im in pil:
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGB")
        if max(im.size) != size:
            scale = size / max(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))),
                           Image.NEAREST if scale > 1 else Image.BILINEAR)
        kind = fmt if fmt != "auto" else ("png" if im.mode == "L" else "webp")
        buf = io.BytesIO()
        if kind == "webp":
            im.save(buf, format="WEBP", quality=80, method=4)
        elif kind == "jpeg":
            im.convert("RGB").save(buf, format="JPEG", quality=85)
        elif kind == "png":
            im.save(buf, format="PNG", optimize=True)
        else:
            raise ValueError(f"thumbnail_format must be 'auto', 'png', 'webp' or 'jpeg', got {fmt!r}")
        uris.append(f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return uris


def _texts(texts: Any, n: int) -> list:
    texts = list(texts)
    if len(texts) != n:
        raise ValueError(f"texts must have one entry per probe sample ({n}), got {len(texts)}")
    out = []
    for t in texts:
        if isinstance(t, str):
            out.append(t)
        elif hasattr(t, "tolist") or isinstance(t, (tuple, list)):
            values = t.tolist() if hasattr(t, "tolist") else list(t)
            out.append("(" + ", ".join(str(v) for v in np.atleast_1d(values)) + ")")
        else:
            out.append(str(t))
    return out


def _encode(arr: np.ndarray) -> dict:
    arr = np.ascontiguousarray(arr)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape),
            "b64": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii")}


def _decode(blob: dict) -> np.ndarray:
    dtype = np.dtype(blob["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(blob["b64"]), dtype=dtype).reshape(blob["shape"])


def _neighbour_lists(kernel: Any, k: int, labels: Optional[np.ndarray], lowest: bool) -> dict:
    """{variant: (indices [n, k_v], R [n, k_v])} from :func:`top_correlated`."""
    from .analysis.neighbours import top_correlated

    n = kernel.num_samples if hasattr(kernel, "num_samples") else np.shape(kernel)[0]
    lists = {}
    variants = [("most", False, False)] + ([("least", True, False)] if lowest else [])
    if labels is not None:
        variants += [("most_other", False, True)] + ([("least_other", True, True)] if lowest else [])
    for name, low, other in variants:
        available = n - 1
        if other:
            available = n - int(np.unique(labels, return_counts=True)[1].max())
        kk = min(k, available)
        if kk < 1:
            continue
        idx, val = top_correlated(kernel, None, kk, labels=labels, exclude_same_label=other, lowest=low)
        lists[name] = (idx, val)
    return lists


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------

def explore(
    kernel: Any,
    *,
    embedding: Any = None,
    images: Any = None,
    texts: Any = None,
    labels: Any = None,
    hierarchy: Any = None,
    scores: Optional[Mapping[str, Any]] = None,
    k: int = 15,
    path: Union[str, Path] = "kernel.html",
    label_names: Any = None,
    title: Optional[str] = None,
    color_by: Optional[str] = None,
    lowest: bool = True,
    thumbnail_size: int = 32,
    thumbnail_format: str = "auto",
    random_state: Optional[int] = 0,
    neighbours: Optional[Mapping[str, Any]] = None,
) -> ExplorerPage:
    """Write the interactive kernel explorer for ``kernel`` to ``path``; returns the path.

    Args:
        kernel: a square :class:`~devinterp_losskernel.LossKernel` (or an [n, n] matrix, taken
            as K̂). K(x, x), the mean loss and the loss at w* come from it when it has them.
        embedding: [n, 2] coordinates or an :class:`~devinterp_losskernel.analysis.Embedding`;
            default: :func:`umap_embedding` of the kernel (same-label edges removed when there
            are labels), seeded with ``random_state``.
        images: [n, H, W] / [n, H, W, C] / [n, C, H, W] arrays (uint8, or floats, scaled to
            0…255) or a list of PIL images; embedded as ``thumbnail_size``-px thumbnails
            (PNG for grey images, WebP for colour, or ``thumbnail_format``).
        texts: one string per sample (an LM probe's text or tokens), or tuples such as the
            (a, b) pair of modular arithmetic; shown where there is no image.
        labels: [n] integer labels; default ``kernel.labels``. ``label_names``: a list
            (label i → name) or mapping; with a ``hierarchy``, names default to its node names.
        hierarchy: a :class:`~devinterp_losskernel.Hierarchy` — the WordNet path on hover,
            the "hierarchy position" colouring (:meth:`Hierarchy.position_colors`), and search
            by any node on the path.
        scores: {name: [n] values} to colour by (memorization, task, loss, a 0/1 flag …):
            at most 12 distinct integers are drawn as categories, anything else continuously.
        k: neighbours shipped per sample and variant (most/least correlated, all or
            different-label only), capped at the candidates available.
        color_by: the colouring shown first (``"label"``, ``"hierarchy"``, a score name …).
        lowest: also ship the least correlated lists (the toggle).
        neighbours: optional precomputed lists {variant: (indices [n, k], R [n, k])}, variants
            ``most``, ``least``, ``most_other``, ``least_other``; then ``kernel`` may also be
            a dict with ``variance`` / ``mean`` arrays (for kernels too large for n × n).

    Returns:
        :class:`ExplorerPage`, the path as a ``str`` that Jupyter displays inline.
    """
    # -- the kernel's per-sample numbers
    if isinstance(kernel, Mapping):
        n = len(_numpy(kernel["variance"]))
        variance = _per_sample(kernel["variance"], n, "kernel['variance']")
        mean = None if kernel.get("mean") is None else _per_sample(kernel["mean"], n, "kernel['mean']")
        init_loss = None if kernel.get("init_loss") is None else _per_sample(kernel["init_loss"], n, "init_loss")
        kernel_labels = kernel.get("labels")
        if neighbours is None:
            raise ValueError("a kernel given as a dict of per-sample arrays needs neighbours=")
    elif hasattr(kernel, "covariance"):
        if getattr(kernel, "is_rectangular", False):
            raise ValueError("explore needs a square kernel (all n × n correlations), got a rectangular one")
        n = kernel.num_samples
        variance = _numpy(kernel.variance).astype(np.float64)
        mean = _numpy(kernel.mean).astype(np.float64)
        init_loss = None if kernel.init_loss is None else _numpy(kernel.init_loss).astype(np.float64)
        kernel_labels = kernel.labels
    else:
        matrix = _numpy(kernel)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"kernel must be a LossKernel or a square matrix, got shape {matrix.shape}")
        n = matrix.shape[0]
        variance, mean, init_loss, kernel_labels = np.diag(matrix).astype(np.float64), None, None, None
    if n < 2:
        raise ValueError(f"explore needs at least 2 samples, got {n}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(min(k, n - 1))

    if labels is None and kernel_labels is not None:
        labels = kernel_labels
    label_arr = None
    if labels is not None:
        from .kernel import as_labels

        label_arr = as_labels(labels, n).numpy()

    # -- the map
    if embedding is None:
        if isinstance(kernel, Mapping):
            raise ValueError("a kernel given as a dict of per-sample arrays needs embedding=")
        from .analysis.embedding import umap_embedding

        emb = umap_embedding(kernel, labels=label_arr, exclude_same_label_edges=label_arr is not None,
                             random_state=random_state, n_neighbors=min(15, n - 1))
        coords = emb.embedding
    else:
        coords = getattr(embedding, "embedding", embedding)
    coords = _numpy(coords).astype(np.float64)
    if coords.ndim != 2 or coords.shape[0] != n or coords.shape[1] < 2:
        raise ValueError(f"embedding must be [n, 2] with n={n}, got shape {coords.shape}")
    coords = coords[:, :2]

    # -- neighbour lists (top-k only)
    if neighbours is None:
        lists = _neighbour_lists(kernel, k, label_arr, lowest)
    else:
        lists = {}
        for name, (idx, val) in neighbours.items():
            if name not in ("most", "least", "most_other", "least_other"):
                raise ValueError(f"neighbours: unknown variant {name!r}")
            idx, val = _numpy(idx), _numpy(val)
            if idx.shape != val.shape or idx.ndim != 2 or idx.shape[0] != n:
                raise ValueError(f"neighbours[{name!r}] must be two [n, k] arrays, got {idx.shape}, {val.shape}")
            lists[name] = (idx, val)

    # -- per-sample text: label names, hierarchy paths
    names_of: Dict[Any, str] = {}
    paths = [""] * n
    if label_arr is not None:
        uniques = np.unique(label_arr)
        for u in uniques.tolist():
            if label_names is not None:
                try:
                    names_of[u] = str(label_names[u])
                except (KeyError, IndexError, TypeError):
                    names_of[u] = str(u)
            elif hierarchy is not None:
                try:
                    names_of[u] = hierarchy.name(hierarchy.node_of(u))
                except ValueError:
                    names_of[u] = str(u)
            else:
                names_of[u] = str(u)
        if hierarchy is not None:
            path_of = {}
            for u in uniques.tolist():
                try:
                    path_of[u] = " › ".join(hierarchy.name(node) for node in hierarchy.path(hierarchy.node_of(u)))
                except ValueError:
                    path_of[u] = ""
            paths = [path_of[u] for u in label_arr.tolist()]
        label_text = [names_of[u] for u in label_arr.tolist()]
    else:
        label_text = [""] * n

    # -- colourings: {key: (title, colours [n], legend)}
    colourings: Dict[str, tuple] = {}
    if label_arr is not None:
        uniques = np.unique(label_arr)
        if hierarchy is not None:  # categories in the tree's order, so the legend follows it
            try:
                pos = hierarchy.positions(uniques)
                uniques = uniques[np.argsort(pos, kind="stable")]
            except ValueError:
                pass
        pal = _palette(len(uniques))
        colour_of = {u: pal[i] for i, u in enumerate(uniques.tolist())}
        colourings["label"] = ("label", [colour_of[u] for u in label_arr.tolist()],
                               {"kind": "categorical",
                                "items": [[names_of[u], colour_of[u]] for u in uniques.tolist()]})
    if hierarchy is not None and label_arr is not None:
        rgba = hierarchy.position_colors(label_arr, cmap="hsv")
        items = {}
        for u in np.unique(label_arr).tolist():
            items[u] = _hex(hierarchy.position_colors(np.array([u]), cmap="hsv"))[0]
        order = sorted(items, key=lambda u: float(hierarchy.positions(np.array([u]))[0]))
        colourings["hierarchy"] = ("hierarchy position", _hex(rgba),
                                   {"kind": "categorical", "continuous_hint": True,
                                    "items": [[names_of[u], items[u]] for u in order]})
    numeric = [("variance", "K(x,x)", variance)]
    if mean is not None:
        numeric.append(("mean_loss", "mean loss over draws", mean))
    if init_loss is not None:
        numeric.append(("init_loss", "loss at w*", init_loss))
    for key, name, values in numeric:
        colourings[key] = (name, *_continuous(values))
    score_values: Dict[str, np.ndarray] = {}
    for i, (name, values) in enumerate((scores or {}).items()):
        arr = _per_sample(values, n, f"scores[{name!r}]")
        score_values[str(name)] = arr
        key = f"score{i}"
        distinct = np.unique(arr[np.isfinite(arr)])
        if len(distinct) <= 12 and np.all(distinct == np.round(distinct)):
            pal = _palette(len(distinct)) if len(distinct) > 2 else ["#c8c8c8", "#d62728"][: len(distinct)]
            cmap = {float(v): pal[j] for j, v in enumerate(distinct)}
            colourings[key] = (str(name), [cmap.get(float(v), "#bbbbbb") for v in arr],
                               {"kind": "categorical",
                                "items": [[f"{name} = {v:g}", cmap[float(v)]] for v in distinct]})
        else:
            colourings[key] = (str(name), *_continuous(arr, "plasma"))
    if color_by is None:
        first = next(iter(colourings))
    else:
        by_title = {t: key for key, (t, _, _) in colourings.items()}
        if color_by in colourings:
            first = color_by
        elif color_by in by_title:
            first = by_title[color_by]
        else:
            raise ValueError(f"color_by must be one of {list(colourings)} or {list(by_title)}, got {color_by!r}")

    thumbs = _thumbnail_uris(images, n, thumbnail_size, thumbnail_format) if images is not None else [""] * n
    text_col = _texts(texts, n) if texts is not None else [""] * n

    data = {
        "format": "devinterp_losskernel.explorer", "version": 1, "n": n, "k": k,
        "r_scale": _R_SCALE,
        "neighbours": {
            name: {"indices": _encode(idx.astype(np.uint16 if n <= 65536 else np.int32)),
                   "r": _encode(np.round(np.clip(val, -1, 1) * _R_SCALE).astype(np.int16))}
            for name, (idx, val) in lists.items()
        },
        "colourings": [{"key": key, "title": t, "legend": legend} for key, (t, _, legend) in colourings.items()],
        "initial": first,
        "has_images": images is not None, "has_texts": texts is not None,
        "has_labels": label_arr is not None, "has_hierarchy": hierarchy is not None,
        "scores": list(score_values),
        "search_terms": sorted(set(label_text) | {p for s in set(paths) for p in s.split(" › ") if p}),
        "title": title or "Loss kernel explorer",
    }
    columns = {
        "x": coords[:, 0], "y": coords[:, 1], "index": np.arange(n),
        "label": label_arr if label_arr is not None else np.full(n, -1),
        "label_name": label_text, "path": paths, "thumb": thumbs, "text": text_col,
        "variance": variance, "mean_loss": mean if mean is not None else np.full(n, np.nan),
        "color": list(colourings[first][1]),
    }
    for key, (_, colours, _) in colourings.items():
        columns[f"c_{key}"] = colours
    page = _render(columns, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return ExplorerPage(path)


def _tooltip(has_images: bool, has_texts: bool, has_labels: bool, has_hierarchy: bool) -> str:
    parts = ['<div class="lk-tip" style="width:230px;font:12px sans-serif">']
    if has_images:
        parts.append('<img class="lk-tip-thumb" src="@thumb" width="64" height="64" '
                     'style="image-rendering:pixelated;float:left;margin:0 6px 2px 0;border:1px solid #ccc"/>')
    if has_texts:
        parts.append('<div class="lk-tip-text" style="font-family:monospace;white-space:pre-wrap;'
                     'max-height:6em;overflow:hidden">@text</div>')
    parts.append('<div>#@index')
    if has_labels:
        parts.append(' · <b>@label_name</b>')
    parts.append('</div>')
    if has_hierarchy:
        parts.append('<div style="color:#555;font-size:11px">@path</div>')
    parts.append('<div>K(x,x) = @variance{0.0000}</div><div>mean loss = @mean_loss{0.0000}</div>'
                 '<div style="clear:both"></div></div>')
    return "".join(parts)


def _render(columns: dict, data: dict) -> str:
    """The HTML page: a Bokeh WebGL scatter (inline resources) and our panels."""
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, CustomJS, HoverTool, TapTool, WheelZoomTool
    from bokeh.plotting import figure
    from bokeh.resources import Resources

    source = ColumnDataSource({key: (np.asarray(v) if isinstance(v, np.ndarray) else list(v))
                               for key, v in columns.items()}, name="lk-points")
    n = data["n"]
    size = 7 if n <= 2000 else 5 if n <= 12000 else 3
    plot = figure(name="lk-map", output_backend="webgl", width=880, height=720,
                  tools="pan,box_zoom,reset,save", match_aspect=True, toolbar_location="above")
    plot.toolbar.logo = None
    plot.xaxis.visible = plot.yaxis.visible = False
    plot.grid.visible = False
    lines = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": [], "color": []}, name="lk-lines")
    rings = ColumnDataSource({"x": [], "y": []}, name="lk-rings")
    focus = ColumnDataSource({"x": [], "y": []}, name="lk-focus")
    found = ColumnDataSource({"x": [], "y": []}, name="lk-found")
    plot.segment("x0", "y0", "x1", "y1", source=lines, line_color="color", line_width=1.5, line_alpha=0.8)
    points = plot.scatter("x", "y", source=source, size=size, fill_color="color", line_color=None,
                          fill_alpha=0.85, name="lk-scatter",
                          nonselection_fill_alpha=0.85, nonselection_fill_color="color",
                          selection_fill_color="color", selection_fill_alpha=1.0)
    plot.scatter("x", "y", source=found, size=size + 6, fill_color=None, line_color="black", line_width=1.5)
    plot.scatter("x", "y", source=rings, size=size + 6, fill_color=None, line_color="#d62728", line_width=2)
    plot.scatter("x", "y", source=focus, size=size + 10, marker="star", fill_color="gold",
                 line_color="black", line_width=1.5)
    hover = HoverTool(renderers=[points], tooltips=_tooltip(data["has_images"], data["has_texts"],
                                                            data["has_labels"], data["has_hierarchy"]))
    hover.callback = CustomJS(code="if (window.LK) LK.hovered(cb_data.index.indices);")
    wheel = WheelZoomTool()
    plot.add_tools(hover, TapTool(renderers=[points]), wheel)
    plot.toolbar.active_scroll = wheel
    source.selected.js_on_change("indices", CustomJS(code="if (window.LK) LK.tapped(cb_obj.indices);"))
    script, div = components(plot)
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(data["title"])
    return _PAGE.format(title=title, resources=Resources(mode="inline", components=["bokeh", "bokeh-gl"]).render(), plot_div=div, plot_script=script,
                        data_id=_DATA_ID, data=blob, css=_CSS, js=_JS)


def read_explorer(path: Union[str, Path]) -> dict:
    """The data a page embeds, as numpy: ``neighbours`` {variant: (indices, R)}, ``points``
    (the Bokeh source's columns: x, y, colours c_<key>, thumbnails …) and the page's JSON
    (colourings with legends, search terms)."""
    text = Path(path).read_text(encoding="utf-8")
    match = re.search(rf'<script type="application/json" id="{_DATA_ID}">(.*?)</script>', text, re.S)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a kernel explorer page")
    data = json.loads(match.group(1))
    data["neighbours"] = {
        name: (_decode(v["indices"]).astype(np.int64), _decode(v["r"]).astype(np.float64) / data["r_scale"])
        for name, v in data["neighbours"].items()
    }
    data["points"] = _bokeh_columns(text, "lk-points")
    return data


def _bokeh_columns(text: str, name: str) -> dict:
    """The columns of the Bokeh ColumnDataSource called ``name`` in a page's docs_json."""
    # bokeh.embed.components writes docs_json as a JS string literal: JSON, HTML-escaped,
    # ' as &#x27;, backslashes doubled (bokeh/embed/elements.py, script_for_render_items)
    for literal in re.findall(r"const docs_json = '(.*?)';", text, re.S):
        docs = json.loads(html.unescape(literal.replace("\\\\", "\\")))
        found = _find_model(docs, name)
        if found is not None:
            return {key: _bokeh_value(value) for key, value in _bokeh_value(found["attributes"]["data"]).items()}
    raise ValueError(f"no Bokeh data source named {name!r} in the page")


def _find_model(node: Any, name: str):
    if isinstance(node, dict):
        if node.get("type") == "object" and node.get("attributes", {}).get("name") == name:
            return node
        for value in node.values():
            found = _find_model(value, name)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find_model(value, name)
            if found is not None:
                return found
    return None


def _bokeh_value(value: Any) -> Any:
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "map":
            return {k: _bokeh_value(v) for k, v in value.get("entries", [])}
        if kind == "ndarray":
            array = value["array"]
            if isinstance(array, dict) and array.get("type") == "bytes":
                dtype = np.dtype(value["dtype"]).newbyteorder("<" if value.get("order", "little") == "little" else ">")
                raw = base64.b64decode(array["data"])
                if raw[:2] == b"\x1f\x8b":  # Bokeh gzips large buffers
                    import gzip

                    raw = gzip.decompress(raw)
                return np.frombuffer(raw, dtype=dtype).reshape(value["shape"])
            return np.asarray(_bokeh_value(array), dtype=value.get("dtype")).reshape(value["shape"])
        if kind == "number":
            return float(value["value"]) if isinstance(value["value"], (int, float)) else float(value["value"])
        return value
    if isinstance(value, list):
        return [_bokeh_value(v) for v in value]
    return value


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
{resources}
<style>{css}</style>
</head>
<body>
<div id="lk-app">
  <div id="lk-map">{plot_div}</div>
  <div id="lk-side">
    <h1 id="lk-title">{title}</h1>
    <div class="lk-row"><label for="lk-color">Colour by</label>
      <select id="lk-color"></select></div>
    <div id="lk-legend"></div>
    <div class="lk-row"><label for="lk-search">Search</label>
      <input id="lk-search" list="lk-terms" placeholder="label or WordNet node">
      <datalist id="lk-terms"></datalist>
      <button id="lk-search-clear" type="button">clear</button></div>
    <div id="lk-search-status"></div>
    <div class="lk-row">
      <label><input type="radio" name="lk-mode" id="lk-most" value="most" checked> most correlated</label>
      <label><input type="radio" name="lk-mode" id="lk-least" value="least"> least correlated</label></div>
    <div class="lk-row"><label><input type="checkbox" id="lk-hide-same"> hide same-label neighbours</label></div>
    <div id="lk-selected">Click a point to see its neighbours.</div>
    <div id="lk-strip"></div>
  </div>
</div>
<script type="application/json" id="{data_id}">{data}</script>
<script>{js}</script>
{plot_script}
</body>
</html>
"""

_CSS = """
body{margin:0;font:13px/1.35 system-ui,sans-serif;color:#222}
#lk-app{display:flex;gap:12px;padding:8px}
#lk-side{width:380px;flex:none}
#lk-title{font-size:16px;margin:4px 0 10px}
.lk-row{margin:6px 0}
.lk-row label{margin-right:8px}
#lk-legend{max-height:220px;overflow:auto;margin:4px 0 8px;font-size:12px}
.lk-swatch{display:inline-block;width:11px;height:11px;margin-right:5px;vertical-align:middle;border-radius:2px}
.lk-legend-item{display:inline-block;margin:0 10px 2px 0;white-space:nowrap}
.lk-bar{height:12px;border-radius:2px}
.lk-bar-labels{display:flex;justify-content:space-between;font-size:11px}
#lk-strip{display:flex;flex-wrap:wrap;gap:6px}
.lk-card{width:70px;font-size:11px;text-align:center;cursor:pointer;border:1px solid #ddd;border-radius:3px;padding:2px}
.lk-card img{width:64px;height:64px;image-rendering:pixelated;display:block;margin:0 auto}
.lk-card .lk-text{font-family:monospace;word-break:break-all;max-height:64px;overflow:hidden}
.lk-card .lk-r{font-weight:bold}
#lk-selected{margin:8px 0 6px}
#lk-selected img{width:96px;height:96px;image-rendering:pixelated;float:left;margin-right:8px}
"""

_JS = r"""
(function(){
"use strict";
const LK = window.LK = {ready:false, mode:"most", hideSame:false, selected:null, hover:null};
const data = JSON.parse(document.getElementById("lk-data").textContent);
LK.data = data;
function decode(blob){
  const bin = atob(blob.b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const T = {uint16:Uint16Array, int32:Int32Array, int16:Int16Array, float32:Float32Array}[blob.dtype];
  return {values:new T(bytes.buffer), k:blob.shape[1]};
}
LK.nbrs = {};
for (const name in data.neighbours){
  LK.nbrs[name] = {idx:decode(data.neighbours[name].indices), r:decode(data.neighbours[name].r)};
}
function esc(s){ return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c])); }
LK.neighbours = function(i){
  const variant = LK.mode + (LK.hideSame && data.has_labels ? "_other" : "");
  const v = LK.nbrs[variant] || LK.nbrs[LK.mode];
  if (!v) return [];
  const k = v.idx.k, out = [];
  for (let j = 0; j < k; j++) out.push({index:v.idx.values[i*k+j], r:v.r.values[i*k+j]/data.r_scale});
  return out;
};
function model(name){ return LK.doc.get_model_by_name(name); }
function thumbHtml(d, i, cls){
  if (data.has_images && d.thumb[i]) return '<img class="'+cls+'" src="'+d.thumb[i]+'" alt="#'+i+'">';
  if (data.has_texts) return '<div class="lk-text">'+esc(d.text[i])+'</div>';
  return '<div class="lk-text">#'+i+'</div>';
}
LK.render = function(){
  const strip = document.getElementById("lk-strip"), sel = document.getElementById("lk-selected");
  const lines = model("lk-lines"), rings = model("lk-rings"), focus = model("lk-focus");
  const i = LK.selected;
  if (i == null){
    strip.innerHTML = ""; sel.textContent = "Click a point to see its neighbours.";
    lines.data = {x0:[], y0:[], x1:[], y1:[], color:[]}; rings.data = {x:[], y:[]}; focus.data = {x:[], y:[]};
    return;
  }
  const d = LK.source.data, nb = LK.neighbours(i);
  sel.innerHTML = thumbHtml(d, i, "lk-sel-thumb") + '<div><b>#'+i+'</b>'
    + (data.has_labels ? ' · '+esc(d.label_name[i]) : '') + '</div>'
    + (data.has_hierarchy ? '<div style="font-size:11px;color:#555">'+esc(d.path[i])+'</div>' : '')
    + '<div>K(x,x) = '+Number(d.variance[i]).toExponential(3)+'</div>'
    + '<div>'+(LK.mode == "most" ? "most" : "least")+' correlated'
    + (LK.hideSame ? ', other labels only' : '')+':</div><div style="clear:both"></div>';
  strip.innerHTML = nb.map(o => '<div class="lk-card" data-index="'+o.index+'" data-r="'+o.r+'">'
    + thumbHtml(d, o.index, "lk-nbr-thumb")
    + '<div class="lk-r">R = '+o.r.toFixed(3)+'</div>'
    + (data.has_labels ? '<div>'+esc(d.label_name[o.index])+'</div>' : '<div>#'+o.index+'</div>')
    + '</div>').join("");
  for (const card of strip.querySelectorAll(".lk-card"))
    card.addEventListener("click", () => LK.select(Number(card.dataset.index)));
  const colour = LK.mode == "most" ? "#d62728" : "#1f77b4";
  lines.data = {x0:nb.map(() => d.x[i]), y0:nb.map(() => d.y[i]), x1:nb.map(o => d.x[o.index]),
                y1:nb.map(o => d.y[o.index]), color:nb.map(() => colour)};
  rings.data = {x:nb.map(o => d.x[o.index]), y:nb.map(o => d.y[o.index])};
  focus.data = {x:[d.x[i]], y:[d.y[i]]};
};
LK.select = function(i){ LK.selected = (i == null || isNaN(i)) ? null : Number(i); LK.render(); };
LK.tapped = function(indices){ if (indices && indices.length) LK.select(indices[0]); };
LK.hovered = function(indices){ LK.hover = (indices && indices.length) ? indices[0] : null; };
LK.colourBy = function(key){
  const d = LK.source.data;
  if (!(("c_"+key) in d)) return;
  const copy = Object.assign({}, d); copy.color = d["c_"+key];
  LK.source.data = copy; LK.colour = key;
  document.getElementById("lk-color").value = key;
  const c = data.colourings.find(c => c.key == key), leg = document.getElementById("lk-legend");
  if (c.legend.kind == "categorical"){
    const items = c.legend.items, shown = items.slice(0, 60);
    leg.innerHTML = shown.map(([name, col]) => '<span class="lk-legend-item"><span class="lk-swatch" style="background:'
      + col + '"></span>' + esc(name) + '</span>').join("")
      + (items.length > shown.length ? '<div>… and '+(items.length - shown.length)+' more</div>' : '');
  } else {
    leg.innerHTML = '<div class="lk-bar" style="background:linear-gradient(to right,'+c.legend.stops.join(",")+')"></div>'
      + '<div class="lk-bar-labels"><span>'+Number(c.legend.min).toPrecision(3)+'</span><span>'
      + esc(c.title) + '</span><span>'+Number(c.legend.max).toPrecision(3)+'</span></div>';
  }
};
LK.search = function(query){
  const found = model("lk-found"), d = LK.source.data, q = String(query || "").trim().toLowerCase();
  const status = document.getElementById("lk-search-status");
  if (!q){ found.data = {x:[], y:[]}; status.textContent = ""; LK.found = []; return []; }
  const exact = [], partial = [];
  for (let i = 0; i < d.x.length; i++){
    const parts = [String(d.label_name[i]).toLowerCase()].concat(
      data.has_hierarchy ? String(d.path[i]).toLowerCase().split(" › ") : []);
    if (parts.includes(q)) exact.push(i);
    else if (parts.some(p => p.includes(q))) partial.push(i);
  }
  const hits = exact.length ? exact : partial;
  found.data = {x:hits.map(i => d.x[i]), y:hits.map(i => d.y[i])};
  status.textContent = hits.length + " sample" + (hits.length == 1 ? "" : "s") + " match “" + query + "”"
    + (exact.length ? "" : (hits.length ? " (partial)" : ""));
  LK.found = hits;
  return hits;
};
LK.screenPoint = function(i){  // page coordinates of sample i (for tests)
  const view = Bokeh.index.find_one(LK.plot), d = LK.source.data;
  const sx = view.frame.x_scale.compute(d.x[i]), sy = view.frame.y_scale.compute(d.y[i]);
  const r = view.canvas_view.el.getBoundingClientRect();
  return [r.left + sx, r.top + sy];
};
LK.webgl = function(){ const v = Bokeh.index.find_one(LK.plot); return !!(v && v.canvas_view && v.canvas_view.webgl); };
function init(){
  if (!(window.Bokeh && Bokeh.documents && Bokeh.documents.length && Bokeh.documents[0].get_model_by_name("lk-points"))){
    return setTimeout(init, 20);
  }
  LK.doc = Bokeh.documents[0];
  LK.source = model("lk-points"); LK.plot = model("lk-map");
  if (!Bokeh.index.find_one(LK.plot)) return setTimeout(init, 20);
  const select = document.getElementById("lk-color");
  select.innerHTML = data.colourings.map(c => '<option value="'+esc(c.key)+'">'+esc(c.title)+'</option>').join("");
  select.addEventListener("change", () => LK.colourBy(select.value));
  document.getElementById("lk-terms").innerHTML = data.search_terms.map(t => '<option value="'+esc(t)+'">').join("");
  const input = document.getElementById("lk-search");
  input.addEventListener("input", () => LK.search(input.value));
  document.getElementById("lk-search-clear").addEventListener("click", () => { input.value = ""; LK.search(""); });
  for (const r of document.querySelectorAll('input[name="lk-mode"]'))
    r.addEventListener("change", () => { LK.mode = r.value; LK.render(); });
  if (!LK.nbrs.least) for (const el of [document.getElementById("lk-least")]) el.disabled = true;
  const hide = document.getElementById("lk-hide-same");
  hide.disabled = !data.has_labels;
  hide.addEventListener("change", () => { LK.hideSame = hide.checked; LK.render(); });
  LK.colourBy(data.initial);
  LK.ready = true;
  document.body.dataset.lkReady = "1";
}
if (document.readyState == "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
"""


class _CallableModule(type(json)):
    """``devinterp_losskernel.explore`` is both this module and the function: importing the
    submodule makes it the package attribute, so the module itself calls :func:`explore`."""

    __call__ = staticmethod(explore)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
