"""The kernel explorer: one self-contained, offline HTML page to walk a loss kernel.

:func:`explore` writes a single HTML file (Bokeh's JavaScript inlined from its wheel through
``bokeh.resources.INLINE``; thumbnails embedded as ``data:`` URIs; no server, no network):

* the map — the UMAP of d = 1 − R (:func:`~devinterp_losskernel.analysis.umap_embedding`,
  same-label edges removed) or an embedding you give, drawn with Bokeh's WebGL backend
  (``output_backend="webgl"``; Bokeh falls back to a 2D canvas where WebGL is missing);
* hover (Bokeh's HoverTool): the thumbnail (image, text / token sequence, or an (a, b) pair),
  label, WordNet path, K(x, x), mean loss over the draws; for a token-level kernel
  (``token_positions`` and ``input_ids``) the token in its sequence, the target marked and the
  tokens after it faded (ids decoded by ``decode=`` / ``vocabulary=``), the neighbours listed
  the same way; for a minibatch-mode kernel (``visits``) the visits, and "seen fewer than
  twice: no variance" where K(x, x) is NaN — those samples are grey, outside every colour scale
  (whose limits come from the finite values only), and counted in the legend;
* click (Bokeh's TapTool, then our JavaScript — Bokeh has no hook for it): the sample's top-k
  most correlated inputs (toggle: least correlated) as a strip of thumbnails with their R,
  lines drawn to them on the map, and an option to hide same-label neighbours (Appendix B);
* colour by label, hierarchy position (the continuous colouring of Fig. 1A), K(x, x), the
  mean loss, the loss at w* or any score given, with a legend;
* search a label or a WordNet node: its members are ringed on the map.

Only the top-k neighbour lists are shipped (indices and R per sample, for each of the four
variants most/least × all/different-label), never the n × n kernel. A token-level kernel's
sequences are shipped once each (only those its rows come from), as indices into one list of
the distinct token strings, and each row as (sequence, position). R is stored as int16
(R · 32767, rounded; error ≤ 1.6e-5), indices as uint16 when n ≤ 65,536 else int32.
:func:`read_explorer` reads a page's data back (the tests use it).

Everything the page embeds as data — our JSON and Bokeh's document — goes through one
encoder, :func:`script_json`, which escapes ``<``, ``>``, ``&``, U+2028 and U+2029, so no
user string (a label name, a title, a text…) can end a ``<script>`` element or open a
comment in it. Every argument is checked before the expensive work (neighbour lists, UMAP);
the page is written atomically (a temp file in the same folder, then ``os.replace``).

Bokeh is imported only here, so ``import devinterp_losskernel`` does not load it. The page
needs the ``[explore]`` extra (Bokeh, matplotlib for the colours, Pillow for thumbnails):
``pip install 'devinterp-losskernel[explore]'``; :func:`explore` names it when one is missing.

    >>> from devinterp_losskernel.explore import explore
    >>> page = explore(kernel, images=images, labels=labels, path="kernel.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import numbers
import random
import re
import sys
import warnings
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .extras import require

__all__ = ["ExplorerPage", "explore", "read_explorer", "script_json"]

_R_SCALE = 32767.0
_DATA_ID = "lk-data"
_BOKEH_ID = "lk-bokeh"
_PLOT_DIV = "lk-plot"
_VARIANTS = ("most", "least", "most_other", "least_other")
_THUMBNAIL_FORMATS = ("auto", "png", "webp", "jpeg")
_MISSING_COLOUR = "#bbbbbb"
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
# embedding values in the page
# --------------------------------------------------------------------------------------------

_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029"}


def script_json(value: Any) -> str:
    """The one encoder for data embedded in the page's ``<script>`` elements.

    JSON (ASCII only; NaN / ±Inf refused, as ``JSON.parse`` would refuse them) in which
    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\u003c``-style escapes: no string
    can then close the script (``</script>``), open a comment (``<!--``) or a tag, and the text
    is also a valid JavaScript literal. ``JSON.parse`` / ``json.loads`` read the strings back
    unchanged.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.translate(_SCRIPT_ESCAPES)


def _html_text(text: str) -> str:
    """A string as HTML element text (the page's <title> and heading): escaped, ASCII only."""
    return html.escape(text, quote=True).encode("ascii", "xmlcharrefreplace").decode("ascii")


# --------------------------------------------------------------------------------------------
# inputs: each checked before any expensive work
# --------------------------------------------------------------------------------------------

@dataclass
class _KernelNumbers:
    """What the page needs from ``kernel``: n and the per-sample numbers."""

    n: int
    variance: np.ndarray
    mean: Optional[np.ndarray]
    init_loss: Optional[np.ndarray]
    labels: Any
    matrix: Any  # a LossKernel or a float64 [n, n] matrix; None for a dict of per-sample arrays
    visits: Optional[np.ndarray] = None  # a minibatch-mode kernel's counts [n]; None otherwise
    unseen: Optional[np.ndarray] = None  # bool [n]: seen fewer than twice, variance NaN; None when none
    token_positions: Any = None  # a token-level kernel's (batch index, target position) [n, 2]
    input_ids: Any = None  # its sequences' token ids [sequences, T + 1]


_KERNEL_DICT_KEYS = ("variance", "mean", "init_loss", "labels", "visits", "token_positions", "input_ids")
_UNSEEN_NOTE = "seen fewer than twice: no variance"


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _kernel_numbers(kernel: Any, needs_matrix: bool) -> _KernelNumbers:
    """Read and check ``kernel``: a LossKernel, a square matrix (K̂), or a dict of per-sample
    arrays (only with ``neighbours=`` and ``embedding=``: ``needs_matrix`` False)."""
    from .kernel import LossKernel
    from .validation import as_matrix, as_vector, checked_kernel

    if isinstance(kernel, (str, bytes, Path)) or hasattr(kernel, "__fspath__"):
        raise TypeError(f"kernel must be a LossKernel, an [n, n] matrix or a dict of per-sample arrays, "
                        f"got the path {str(kernel)!r}; read a saved kernel with LossKernel.load(path)")
    if isinstance(kernel, LossKernel):
        if kernel.is_rectangular:
            raise ValueError("kernel must be square for explore (all n × n correlations), got a rectangular "
                             f"{tuple(kernel.covariance.shape)} kernel")
        n = kernel.num_samples
        # checked once here; the neighbour lists and the map read its cached R (no second conversion)
        matrix = checked_kernel(kernel, "kernel") if needs_matrix else kernel
        return _KernelNumbers(
            n, *_per_sample(kernel, n, "kernel"),
            None if kernel.init_loss is None else as_vector(kernel.init_loss, "kernel.init_loss", n),
            kernel.labels, matrix, *_visit_numbers(kernel, n, "kernel"),
            token_positions=getattr(kernel, "token_positions", None), input_ids=getattr(kernel, "input_ids", None))
    if isinstance(kernel, MappingABC):
        return _kernel_dict_numbers(kernel, needs_matrix)
    if not (isinstance(kernel, np.ndarray) or hasattr(kernel, "detach") or isinstance(kernel, (list, tuple))):
        raise TypeError(f"kernel must be a LossKernel, an [n, n] matrix or a dict of per-sample arrays, "
                        f"got {type(kernel).__name__}")
    matrix = as_matrix(kernel, "kernel")
    return _KernelNumbers(matrix.shape[0], np.diag(matrix).copy(), None, None, None, checked_kernel(matrix, "kernel"))


def _kernel_dict_numbers(kernel: Mapping, needs_matrix: bool) -> _KernelNumbers:
    from .validation import as_vector

    unknown = sorted(str(key) for key in kernel if key not in _KERNEL_DICT_KEYS)
    if unknown:
        raise ValueError(f"kernel as a dict takes the keys {list(_KERNEL_DICT_KEYS)}, got unknown {unknown}")
    if kernel.get("variance") is None:
        raise ValueError("kernel as a dict must have 'variance' (K(x, x), one per sample)")
    if needs_matrix:
        raise ValueError("a kernel given as a dict of per-sample arrays needs neighbours= (the top-k lists) "
                         "and embedding= (the map): there is no n × n matrix to compute them from")
    from types import SimpleNamespace

    from .validation import as_array

    shape = as_array(kernel["variance"], "kernel['variance']").shape
    if len(shape) != 1:
        raise ValueError(f"kernel['variance'] must be a 1-D vector, got shape {shape}")
    n = shape[0]
    # the same rule as a LossKernel's: NaN variances only where visits < 2 (validation._kernel_variances)
    view = SimpleNamespace(num_samples=n, variance=kernel["variance"], mean=kernel.get("mean"),
                           visits=kernel.get("visits"))
    variance, mean = _per_sample(view, n, "kernel")
    init_loss = None if kernel.get("init_loss") is None else as_vector(kernel["init_loss"], "kernel['init_loss']", n)
    return _KernelNumbers(n, variance, mean, init_loss, kernel.get("labels"), None, *_visit_numbers(view, n, "kernel"),
                          token_positions=kernel.get("token_positions"), input_ids=kernel.get("input_ids"))


def _per_sample(kernel: Any, n: int, name: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(variance [n], mean [n] or None): finite, except NaN where a minibatch-mode kernel saw a
    sample fewer than twice (variance) or never (mean) — the package's one rule,
    :func:`~devinterp_losskernel.validation._kernel_variances`."""
    from .validation import _kernel_variances, _visits, as_vector, kernel_mean

    variance, _ = _kernel_variances(kernel, name, n)
    if kernel.mean is None:
        return variance, None
    if _visits(kernel, n, name) is None:
        return variance, as_vector(kernel.mean, f"{name}.mean", n)
    return variance, kernel_mean(kernel, name)


def _visit_numbers(kernel: Any, n: int, name: str) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(visits [n] int64 or None, the bool mask of the samples seen fewer than twice or None)."""
    from .validation import _visits

    visits = _visits(kernel, n, name)
    if visits is None:
        return None, None
    visits = visits.astype(np.int64)
    unseen = visits < 2
    return visits, (unseen if unseen.any() else None)


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this module (the user's line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
    return int(value)


def _check_options(*, k, title, color_by, lowest, thumbnail_size, thumbnail_format, random_state,
                   image_layout, images) -> None:
    """The scalar arguments: types and values."""
    from .validation import IMAGE_LAYOUTS

    _check_int(k, "k")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, got {type(title).__name__}")
    if color_by is not None and not isinstance(color_by, str):
        raise TypeError(f"color_by must be a colouring's key or title (a str) or None, got {type(color_by).__name__}")
    if not isinstance(lowest, (bool, np.bool_)):
        raise TypeError(f"lowest must be True or False, got {lowest!r}")
    _check_int(thumbnail_size, "thumbnail_size")
    if thumbnail_format not in _THUMBNAIL_FORMATS:
        raise ValueError(f"thumbnail_format must be one of {_THUMBNAIL_FORMATS}, got {thumbnail_format!r}")
    if random_state is not None:
        _check_int(random_state, "random_state", low=0)
    if image_layout is not None and image_layout not in IMAGE_LAYOUTS:
        raise ValueError(f"image_layout must be None (read from the shape), 'NHWC' ([n, H, W, C]) or 'NCHW' "
                         f"([n, C, H, W]), got {image_layout!r}")
    if image_layout is not None and images is None:
        raise ValueError(f"image_layout={image_layout!r} was given without images=")


def _output_path(path: Any) -> Path:
    """Where the page goes: a file path in an existing folder, not a file that is not a page."""
    from .validation import check_output_path

    out = check_output_path(path, "path", expect="file")
    if out.is_file() and out.stat().st_size and not _looks_like_html(out):
        raise ValueError(f"path {str(path)!r} exists and is not an HTML page; explore would overwrite it "
                         "with one. Give a new .html path, or remove the file first")
    return out


def _looks_like_html(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _label_array(labels: Any, n: int) -> Optional[np.ndarray]:
    if labels is None:
        return None
    from .kernel import as_labels

    return as_labels(labels, n).numpy()


def _label_names_of(label_names: Any, uniques: List[int]) -> Dict[int, str]:
    """{label: name} from a list (label i → label_names[i], 0 ≤ i < len) or a mapping."""
    if isinstance(label_names, (str, bytes)):
        raise TypeError(f"label_names must be a list (label i → label_names[i]) or a mapping {{label: name}}, "
                        f"got the single string {label_names!r}")
    if isinstance(label_names, MappingABC):
        missing = [u for u in uniques if u not in label_names]
        if missing:
            raise ValueError(f"labels hold {missing[:10]}, which label_names does not name (a mapping with "
                             f"keys {sorted(label_names, key=str)[:10]}); give a name for every label")
        return {u: str(label_names[u]) for u in uniques}
    if not isinstance(label_names, (SequenceABC, np.ndarray)) and not hasattr(label_names, "tolist"):
        raise TypeError(f"label_names must be a list (label i → label_names[i]) or a mapping {{label: name}}, "
                        f"got {type(label_names).__name__}")
    names = label_names.tolist() if hasattr(label_names, "tolist") else list(label_names)
    outside = [u for u in uniques if not 0 <= u < len(names)]
    if outside:
        raise ValueError(f"labels hold {outside[:10]}, which label_names does not name: its {len(names)} names "
                         f"are for labels 0 … {len(names) - 1} (label i → label_names[i]; negative labels are "
                         "never looked up)")
    return {u: str(names[u]) for u in uniques}


def _label_texts(label_arr: Optional[np.ndarray], label_names: Any, hierarchy: Any,
                 n: int) -> Tuple[Dict[int, str], List[str], List[str]]:
    """({label: name}, the name of each sample's label [n], each sample's WordNet path [n])."""
    if label_arr is None:
        for given, what in ((label_names, "label_names"), (hierarchy, "hierarchy")):
            if given is not None:
                raise ValueError(f"{what} was given but there are no labels: pass labels= (or a kernel that "
                                 "carries labels)")
        return {}, [""] * n, [""] * n
    uniques = np.unique(label_arr).tolist()
    if hierarchy is not None:
        _check_hierarchy(hierarchy, uniques)
    if label_names is not None:
        names_of = _label_names_of(label_names, uniques)
    elif hierarchy is not None:
        names_of = {u: hierarchy.name(hierarchy.node_of(u)) for u in uniques}
    else:
        names_of = {u: str(u) for u in uniques}
    paths = [""] * n
    if hierarchy is not None:
        path_of = {u: " › ".join(hierarchy.name(node) for node in hierarchy.path(hierarchy.node_of(u)))
                   for u in uniques}
        paths = [path_of[u] for u in label_arr.tolist()]
    return names_of, [names_of[u] for u in label_arr.tolist()], paths


def _check_hierarchy(hierarchy: Any, uniques: List[int]) -> None:
    from .hierarchy import Hierarchy

    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"hierarchy must be a devinterp_losskernel.hierarchy.Hierarchy, got {type(hierarchy).__name__}")
    hierarchy.nodes_of(np.asarray(uniques))  # ValueError naming the labels it has no node for


def _coordinates(embedding: Any, n: int) -> np.ndarray:
    """[n, 2] finite map coordinates from an array or an Embedding (extra columns: a warning)."""
    from .validation import as_matrix

    coords = as_matrix(getattr(embedding, "embedding", embedding), "embedding", square=False)
    if coords.shape[0] != n or coords.shape[1] < 2:
        raise ValueError(f"embedding must be [n, 2] with n={n} (one point per probe sample), got shape {coords.shape}")
    if coords.shape[1] > 2:
        _warn(f"embedding has {coords.shape[1]} columns; the map shows the first two")
    return coords[:, :2]


def _default_map_neighbours(label_arr: Optional[np.ndarray], n: int) -> int:
    """UMAP's n_neighbors for the default map (same-label edges removed); ValueError naming the
    labels when no sample has a different-label neighbour."""
    if label_arr is None:
        if n < 3:
            raise ValueError(f"the default map (a UMAP of 1 − R) needs at least 3 samples, got n={n}; "
                             "pass embedding=")
        return min(15, n - 1)
    values, counts = np.unique(label_arr, return_counts=True)
    available = n - int(counts.max())
    if available < 1:
        raise ValueError(
            f"labels: all {n} samples have the same label ({values[0]}), so the default map — a UMAP of "
            "1 − R with same-label edges removed — has no edges. Pass labels with at least two distinct "
            "values, or embedding= (e.g. umap_embedding(kernel, exclude_same_label_edges=False).embedding)")
    return min(15, available + 1)


def _given_neighbours(neighbours: Any, n: int, label_arr: Optional[np.ndarray]) -> Dict[str, tuple]:
    """Check precomputed lists {variant: (indices [n, k], R [n, k])} before they are packed."""
    if not isinstance(neighbours, MappingABC):
        raise TypeError(f"neighbours must be a dict {{variant: (indices [n, k], R [n, k])}}, "
                        f"got {type(neighbours).__name__}")
    unknown = [name for name in neighbours if name not in _VARIANTS]
    if unknown:
        raise ValueError(f"neighbours: unknown variant(s) {unknown}; the variants are {list(_VARIANTS)}")
    if "most" not in neighbours:
        raise ValueError(f"neighbours must include 'most' (the most correlated lists), got {list(neighbours)}")
    return {name: _given_list(name, pair, n, label_arr) for name, pair in neighbours.items()}


def _given_list(name: str, pair: Any, n: int, label_arr: Optional[np.ndarray]) -> tuple:
    from .validation import as_index_array, as_matrix

    where = f"neighbours[{name!r}]"
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{where} must be a pair (indices [n, k], R [n, k]), got {type(pair).__name__}")
    idx = as_index_array(pair[0], n, f"{where} indices")
    values = as_matrix(pair[1], f"{where} R", square=False)
    if idx.ndim != 2 or idx.shape[0] != n or idx.shape != values.shape:
        raise ValueError(f"{where} must be two [n, k] arrays with n={n}, got shapes {idx.shape}, {values.shape}")
    if np.abs(values).max() > 1 + 1e-6:
        raise ValueError(f"{where} R must be correlations in [-1, 1], got values up to {np.abs(values).max():.4g}")
    own = np.nonzero(idx == np.arange(n)[:, None])
    if own[0].size:
        raise ValueError(f"{where} indices list sample {own[0][0]} as its own neighbour")
    if name.endswith("_other"):
        _check_other_label(where, idx, label_arr)
    return idx, values


def _check_other_label(where: str, idx: np.ndarray, label_arr: Optional[np.ndarray]) -> None:
    if label_arr is None:
        raise ValueError(f"{where} lists different-label neighbours, but there are no labels: pass labels=")
    same = np.nonzero(label_arr[idx] == label_arr[:, None])
    if same[0].size:
        i, j = int(same[0][0]), int(idx[same[0][0], same[1][0]])
        raise ValueError(f"{where} must hold different-label neighbours only, got sample {j} for sample {i} "
                         f"(same label {label_arr[i]}) and {same[0].size - 1} more")


def _texts(texts: Any, n: int) -> list:
    """One display string per sample: strings as they are, tuples / token arrays as "(a, b, …)"."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be one string (or tuple / token sequence) per probe sample, "
                        "got a single string")
    try:
        texts = texts.tolist() if hasattr(texts, "tolist") else list(texts)
    except TypeError:
        raise TypeError(f"texts must be a sequence with one entry per probe sample, "
                        f"got {type(texts).__name__}") from None
    if len(texts) != n:
        raise ValueError(f"texts must have one entry per probe sample ({n}), got {len(texts)}")
    out = []
    for t in texts:
        if isinstance(t, str):
            out.append(t)
        elif hasattr(t, "tolist") or isinstance(t, (tuple, list)):
            values = t.tolist() if hasattr(t, "tolist") else list(t)
            out.append("(" + ", ".join(str(v) for v in np.atleast_1d(np.asarray(values, dtype=object))) + ")")
        else:
            out.append(str(t))
    return out


_TOKEN_WINDOW = (24, 8)  # tokens shown before and after the target on hover
_TOKEN_CARD_WINDOW = (10, 3)  # … and in a neighbour's card


def _small_ints(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint16 if arr.size == 0 or int(arr.max()) < 65536 else np.int32)


def _token_data(numbers_: _KernelNumbers, decode: Any, vocabulary: Any) -> Optional[dict]:
    """A token-level kernel's rows for the page: every sequence some row comes from, stored once
    (its tokens as indices into one list of the distinct token strings), and each row as a
    (stored sequence, position) pair. None for a kernel that is not token-level (then
    ``decode`` / ``vocabulary`` are refused)."""
    from .validation import check_token_rows, token_strings

    given = "decode" if decode is not None else "vocabulary" if vocabulary is not None else None
    if numbers_.token_positions is None:
        if given is not None:
            raise ValueError(f"{given}= maps token ids to strings for a token-level kernel (one with "
                             "token_positions and input_ids: bif(..., correlation_method='token', "
                             "return_kernel=True)); this kernel has no token_positions")
        if numbers_.input_ids is not None:
            raise ValueError("kernel['input_ids'] was given without kernel['token_positions'] (batch index, "
                             "target position) [n, 2]")
        return None
    positions, ids = check_token_rows(numbers_.token_positions, numbers_.input_ids, numbers_.n)
    if ids is None:
        if given is not None:
            raise ValueError(f"{given}= was given but the kernel carries no input_ids (the sequences' token "
                             "ids), so there are no tokens to show; the page shows (sequence, position) only")
        return {"batch": None, "positions": _encode(_small_ints(positions)), "sequences": None,
                "ids": [], "strings": [], "window": list(_TOKEN_WINDOW), "card_window": list(_TOKEN_CARD_WINDOW)}
    used, compact = np.unique(positions[:, 0], return_inverse=True)  # only the sequences rows come from
    distinct, codes = np.unique(ids[used], return_inverse=True)
    strings = token_strings(distinct, decode, vocabulary)
    return {"batch": _encode(_small_ints(used)),
            "positions": _encode(_small_ints(np.stack([compact.reshape(-1), positions[:, 1]], axis=1))),
            "sequences": _encode(_small_ints(codes.reshape(len(used), ids.shape[1]))),
            "ids": distinct.tolist(), "strings": strings,
            "window": list(_TOKEN_WINDOW), "card_window": list(_TOKEN_CARD_WINDOW)}


def _score_arrays(scores: Any, n: int) -> Dict[str, np.ndarray]:
    """{name: float64 [n]} from {name: values}; names as str, each once; numbers only."""
    if scores is None:
        return {}
    if not isinstance(scores, MappingABC):
        raise TypeError(f"scores must be a dict {{name: [n] values}}, got {type(scores).__name__}")
    out: Dict[str, np.ndarray] = {}
    for name, values in scores.items():
        key = str(name)
        if key in out:
            raise ValueError(f"scores has two entries named {key!r}")
        arr = _numpy(values)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"scores[{key!r}] must hold numbers, got dtype {arr.dtype}")
        if arr.shape != (n,):
            raise ValueError(f"scores[{key!r}] must have one value per probe sample, shape ({n},), got {arr.shape}")
        out[key] = arr.astype(np.float64)
    return out


# --------------------------------------------------------------------------------------------
# colours and thumbnails
# --------------------------------------------------------------------------------------------

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
        lightness, s = (0.45, 0.75) if i % 2 == 0 else (0.62, 0.65)
        out.append("#%02x%02x%02x" % tuple(int(round(c * 255)) for c in colorsys.hls_to_rgb(h, lightness, s)))
    return out


def _warn_missing(values: np.ndarray, name: str) -> int:
    """The number of NaN/±Inf values; a warning when there are any (they are drawn grey)."""
    missing = int((~np.isfinite(values)).sum())
    if missing:
        _warn(f"{name}: {missing} of {len(values)} values are NaN/Inf; they are drawn grey and "
              "counted in the legend as 'no value'")
    return missing


def _missing_note(values: np.ndarray, unseen: Optional[np.ndarray]) -> Optional[str]:
    """What the legend calls the missing values when they are explained by the kernel: a
    minibatch-mode kernel's samples seen fewer than twice (NaN there and only there); else None
    (then missing values are warned about as NaN/Inf)."""
    missing = ~np.isfinite(values)
    if unseen is None or not missing.any() or (missing & ~unseen).any():
        return None
    return _UNSEEN_NOTE if np.array_equal(missing, unseen) else "seen fewer than twice: no value"


def _continuous(values: np.ndarray, name: str, cmap: str = "viridis", missing_label: Optional[str] = None) -> tuple:
    """Colours over the finite values only (limits from them; NaN/Inf drawn grey, outside the
    scale, and counted in the legend as ``missing_label`` — then without a warning — or as
    'no value (NaN/Inf)')."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 1.0)
    t = np.zeros_like(v) if hi <= lo else (np.where(finite, v, lo) - lo) / (hi - lo)
    colours = _hex(colormaps[cmap](np.where(finite, t, 0.0)))
    colours = [c if f else _MISSING_COLOUR for c, f in zip(colours, finite)]
    stops = _hex(colormaps[cmap](np.linspace(0, 1, 9)))
    missing = int((~finite).sum()) if missing_label is not None else _warn_missing(v, name)
    legend = {"kind": "continuous", "min": lo, "max": hi, "stops": stops, "missing": missing,
              "missing_label": missing_label or "no value (NaN/Inf)"}
    return colours, legend


def _categorical_score(name: str, arr: np.ndarray, distinct: np.ndarray, missing_label: Optional[str] = None) -> tuple:
    pal = _palette(len(distinct)) if len(distinct) > 2 else ["#c8c8c8", "#d62728"][: len(distinct)]
    cmap = {float(v): pal[j] for j, v in enumerate(distinct)}
    items = [[f"{name} = {v:g}", cmap[float(v)]] for v in distinct]
    if missing_label is not None:
        missing = int((~np.isfinite(arr)).sum())
    else:
        missing = _warn_missing(arr, f"scores[{name!r}]")
    if missing:
        items.append([f"{missing_label or 'no value (NaN/Inf)'}: {missing}", _MISSING_COLOUR])
    return name, [cmap.get(float(v), _MISSING_COLOUR) for v in arr], {"kind": "categorical", "items": items}


def _score_colouring(name: str, arr: np.ndarray, unseen: Optional[np.ndarray] = None) -> tuple:
    """At most 12 distinct whole numbers: categories; anything else: a continuous colouring.
    NaN exactly at a minibatch-mode kernel's unseen samples is named so, without a warning."""
    distinct = np.unique(arr[np.isfinite(arr)])
    note = _missing_note(arr, unseen)
    if len(distinct) <= 12 and np.all(distinct == np.round(distinct)):
        return _categorical_score(name, arr, distinct, note)
    return (name, *_continuous(arr, f"scores[{name!r}]", "plasma", note))


def _label_colourings(label_arr: np.ndarray, names_of: Dict[int, str], hierarchy: Any) -> Dict[str, tuple]:
    colourings: Dict[str, tuple] = {}
    uniques = np.unique(label_arr)
    if hierarchy is not None:  # categories in the tree's order, so the legend follows it
        uniques = uniques[np.argsort(hierarchy.positions(uniques), kind="stable")]
    pal = _palette(len(uniques))
    colour_of = {u: pal[i] for i, u in enumerate(uniques.tolist())}
    colourings["label"] = ("label", [colour_of[u] for u in label_arr.tolist()],
                           {"kind": "categorical", "items": [[names_of[u], colour_of[u]] for u in uniques.tolist()]})
    if hierarchy is not None:
        rgba = hierarchy.position_colors(label_arr, cmap="hsv")
        ordered = uniques.tolist()  # already in the tree's order
        item_colours = _hex(hierarchy.position_colors(np.asarray(ordered), cmap="hsv"))
        colourings["hierarchy"] = ("hierarchy position", _hex(rgba),
                                   {"kind": "categorical", "continuous_hint": True,
                                    "items": [[names_of[u], c] for u, c in zip(ordered, item_colours)]})
    return colourings


def _colourings(numbers_: _KernelNumbers, label_arr, names_of, hierarchy,
                scores: Dict[str, np.ndarray]) -> Dict[str, tuple]:
    """{key: (title, colours [n], legend)} in the order the menu lists them."""
    colourings = {} if label_arr is None else _label_colourings(label_arr, names_of, hierarchy)
    numeric = [("variance", "K(x,x)", numbers_.variance), ("mean_loss", "mean loss over draws", numbers_.mean),
               ("init_loss", "loss at w*", numbers_.init_loss)]
    unseen = numbers_.unseen
    for key, title, values in numeric:
        if values is not None:
            note = _missing_note(values, unseen)
            if key == "mean_loss" and note is not None:
                note = "never seen: no mean"
            colourings[key] = (title, *_continuous(values, title, missing_label=note))
    for i, (name, arr) in enumerate(scores.items()):
        colourings[f"score{i}"] = _score_colouring(name, arr, unseen)
    return colourings


def _initial_colouring(colourings: Dict[str, tuple], color_by: Optional[str], labels_mixed: bool = False) -> str:
    """``color_by``, else what the run found: the first score given, else K(x, x) (the
    memorization score) when the map mixes labels by design (same-label edges removed), else
    the first colouring."""
    if color_by is None:
        scores = [key for key in colourings if key.startswith("score")]
        if scores:
            return scores[0]
        if labels_mixed and "variance" in colourings:
            return "variance"
        return next(iter(colourings))
    by_title = {t: key for key, (t, _, _) in colourings.items()}
    if color_by in colourings:
        return color_by
    if color_by in by_title:
        return by_title[color_by]
    raise ValueError(f"color_by must be one of {list(colourings)} or {list(by_title)}, got {color_by!r}")


def _pil_images(images: Any, n: int, layout: Optional[str]) -> list:
    """PIL images, one per sample, from a list of PIL images or an array (see as_images)."""
    from PIL import Image

    from .validation import as_images

    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        if layout is not None:
            raise ValueError("image_layout applies to image arrays, not to a list of PIL images")
        if len(images) != n:
            raise ValueError(f"images must have one image per probe sample ({n}), got {len(images)}")
        bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if bad:
            raise TypeError(f"images: entry {bad[0]} is a {type(images[bad[0]]).__name__}, not a PIL image")
        return list(images)
    arr = _to_uint8(as_images(images, n, "images", layout=layout))
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as it is; bool ×255; integers within 0…255 as they are; anything else (floats in
    [0, 1] as 0…255, else min–max over all images) scaled to 0…255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scaled = (arr.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _thumbnail_uris(pil: list, size: int, fmt: str) -> list:
    """One ``data:image/…;base64`` URI per image, the longer side scaled to ``size`` px."""
    from PIL import Image

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
        else:
            im.save(buf, format="PNG", optimize=True)
        uris.append(f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return uris


# --------------------------------------------------------------------------------------------
# neighbour lists and the map (the expensive part)
# --------------------------------------------------------------------------------------------

def _encode(arr: np.ndarray) -> dict:
    arr = np.ascontiguousarray(arr)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape),
            "b64": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii")}


def _decode(blob: dict) -> np.ndarray:
    dtype = np.dtype(blob["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(blob["b64"]), dtype=dtype).reshape(blob["shape"])


def _neighbour_lists(matrix: Any, k: int, labels: Optional[np.ndarray],
                     lowest: bool) -> Tuple[dict, Dict[str, str]]:
    """({variant: (indices [n, k_v], R [n, k_v])}, {variant: why it is missing}) from
    :func:`top_correlated`; a warning for each different-label variant that cannot be made."""
    from .analysis.neighbours import top_correlated

    n = matrix.num_samples if hasattr(matrix, "num_samples") else matrix.shape[0]
    lists, unavailable = {}, {}
    variants = [("most", False, False)] + ([("least", True, False)] if lowest else [])
    if labels is not None:
        variants += [("most_other", False, True)] + ([("least_other", True, True)] if lowest else [])
    for name, low, other in variants:
        available = n - 1
        if other:
            available = n - int(np.unique(labels, return_counts=True)[1].max())
        if available < 1:
            unavailable[name] = "every sample has the same label: no different-label neighbours"
            continue
        lists[name] = top_correlated(matrix, None, min(k, available), labels=labels,
                                     exclude_same_label=other, lowest=low)
    if unavailable:
        _warn(f"labels: every sample has the same label, so the page has no different-label "
              f"neighbour lists ({', '.join(unavailable)}); 'hide same-label neighbours' is disabled")
    return lists, unavailable


def _import_umap() -> None:
    """Import umap-learn leaving Python's global RNG as it was: umap imports scikit-learn,
    which (1.9) imports rich, whose import draws from it (rich/style.py: getrandbits)."""
    state = random.getstate()
    try:
        import umap  # noqa: F401
    finally:
        random.setstate(state)


def _umap_map(matrix: Any, label_arr: Optional[np.ndarray], n_neighbors: int, seed: int) -> np.ndarray:
    from .analysis.embedding import umap_embedding

    _import_umap()

    emb = umap_embedding(matrix, labels=label_arr, exclude_same_label_edges=label_arr is not None,
                         random_state=seed, n_neighbors=n_neighbors)
    return np.asarray(emb.embedding, dtype=np.float64)[:, :2]


def _seed(random_state: Optional[int]) -> int:
    """UMAP's seed: ``random_state``, or for None one drawn from the OS (never a global RNG)."""
    if random_state is not None:
        return int(random_state)
    return int(np.random.default_rng().integers(0, 2**31 - 1))


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------

def explore(
    kernel: Any,
    *,
    embedding: Any = None,
    images: Any = None,
    image_layout: Optional[str] = None,
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
    decode: Any = None,
    vocabulary: Any = None,
) -> ExplorerPage:
    """Write the interactive kernel explorer for ``kernel`` to ``path``; returns the path.

    Every argument is checked first (ValueError / TypeError naming it), before the neighbour
    lists and the UMAP are computed.

    Args:
        kernel: a square :class:`~devinterp_losskernel.LossKernel` (or an [n, n] matrix, taken
            as K̂). K(x, x), the mean loss and the loss at w* come from it when it has them.
        embedding: [n, 2] coordinates or an :class:`~devinterp_losskernel.analysis.Embedding`;
            default: :func:`umap_embedding` of the kernel (same-label edges removed when there
            are labels; n_neighbors = 15, or fewer when the labels leave fewer candidates),
            seeded with ``random_state``.
        images: [n, H, W], [n, H, W, C] or [n, C, H, W] arrays with C ∈ {1, 3, 4} (uint8;
            integers in 0…255; floats in [0, 1], else min–max scaled to 0…255; all finite) or a
            list of PIL images; embedded as ``thumbnail_size``-px thumbnails (PNG for grey
            images, WebP for colour, or ``thumbnail_format``). The layout follows
            :func:`~devinterp_losskernel.validation.as_images`: a shape where both axis 1 and
            the last axis could be the channels (``[n, 3, 4, 4]``) is refused unless
            ``image_layout`` (``"NCHW"`` or ``"NHWC"``) states it.
        texts: one string per sample (an LM probe's text or tokens), or tuples such as the
            (a, b) pair of modular arithmetic; shown where there is no image.
        labels: [n] integer labels; default ``kernel.labels``. ``label_names``: a list
            (label i → ``label_names[i]``, for 0 ≤ i < len) or a mapping {label: name}; every
            label must have a name. With a ``hierarchy``, names default to its node names.
        hierarchy: a :class:`~devinterp_losskernel.hierarchy.Hierarchy` with a node for every label —
            the WordNet path on hover, the "hierarchy position" colouring
            (:meth:`Hierarchy.position_colors`), and search by any node on the path.
        scores: {name: [n] numbers} to colour by (memorization, task, loss, a 0/1 flag …):
            at most 12 distinct integers are drawn as categories, anything else continuously;
            NaN/Inf values are drawn grey, with a warning and a count in the legend.
        k: neighbours shipped per sample and variant (most/least correlated, all or
            different-label only), capped at the candidates available.
        path: the HTML file to write, in an existing folder; an existing file there is
            replaced only if it is an HTML page. Written atomically.
        color_by: the colouring shown first (``"label"``, ``"hierarchy"``, a score name …);
            default: what the run found — the first of ``scores``, else K(x, x) when the map
            removes same-label edges (its label colours mix by design), else the labels.

    The page states on its face how the map was made, and shows the kernel's health report
    (``kernel.metadata["diagnostics"]``) when it carries one.
        lowest: also ship the least correlated lists (the toggle).
        random_state: the UMAP seed (an int ≥ 0); None: a fresh seed from the OS, recorded in
            the page's data as ``random_state`` (no global RNG is used).
        neighbours: optional precomputed lists {variant: (indices [n, k], R [n, k])}, variants
            ``most`` (required), ``least``, ``most_other``, ``least_other``; indices are
            checked (integers in [0, n), never the sample itself, different-label for the
            ``_other`` variants) and R must be in [-1, 1]. Then ``kernel`` may also be a dict
            with ``variance`` / ``mean`` / ``init_loss`` / ``labels`` / ``visits`` /
            ``token_positions`` / ``input_ids`` arrays (for kernels too large for n × n).
        decode, vocabulary: for a token-level kernel (``kernel.token_positions`` and
            ``kernel.input_ids``, from ``bif(..., correlation_method="token", return_kernel=True)``),
            how token ids become text: ``decode`` a callable id → str (``tokenizer.decode``),
            or ``vocabulary`` a list (id → ``vocabulary[id]``) or a mapping {id: str}; default:
            the ids. Hover shows the token in its sequence, the target marked (the tokens after
            it faded), and the neighbours are listed the same way. Each sequence is stored once
            (ids as indices into one list of distinct strings), each row as (sequence, position).

    A minibatch-mode kernel (``kernel.visits``; variance NaN where a training sample was seen
    fewer than twice, the rule of :func:`~devinterp_losskernel.validation._kernel_variances`)
    is drawn with those samples grey, outside every colour scale (limits over the finite values
    only), counted in the legend as "seen fewer than twice: no variance"; hover shows ``visits``.
    Its kernel is diagonal, so it needs ``neighbours=`` and ``embedding=``.

    Returns:
        :class:`ExplorerPage`, the path as a ``str`` that Jupyter displays inline.
    """
    _require_page_modules(images)
    out = _output_path(path)
    _check_options(k=k, title=title, color_by=color_by, lowest=lowest, thumbnail_size=thumbnail_size,
                   thumbnail_format=thumbnail_format, random_state=random_state, image_layout=image_layout,
                   images=images)
    numbers_ = _kernel_numbers(kernel, needs_matrix=neighbours is None or embedding is None)
    n = numbers_.n
    if n < 2:
        raise ValueError(f"explore needs at least 2 samples, got {n}")
    k = min(int(k), n - 1)
    label_arr = _label_array(numbers_.labels if labels is None else labels, n)
    names_of, label_text, paths = _label_texts(label_arr, label_names, hierarchy, n)
    coords = None if embedding is None else _coordinates(embedding, n)
    n_neighbors = _default_map_neighbours(label_arr, n) if embedding is None else None
    given = None if neighbours is None else _given_neighbours(neighbours, n, label_arr)
    colourings = _colourings(numbers_, label_arr, names_of, hierarchy, _score_arrays(scores, n))
    labels_mixed = embedding is None and label_arr is not None
    first = _initial_colouring(colourings, color_by, labels_mixed)
    health = _health_of(kernel)
    tokens = _token_data(numbers_, decode, vocabulary)
    text_col = _texts(texts, n) if texts is not None else [""] * n
    pil = _pil_images(images, n, image_layout) if images is not None else None

    # -- the work: thumbnails, neighbour lists, the map
    thumbs = _thumbnail_uris(pil, thumbnail_size, thumbnail_format) if pil is not None else [""] * n
    lists, unavailable = (given, {}) if given is not None else _neighbour_lists(numbers_.matrix, k, label_arr, lowest)
    seed = None
    if coords is None:
        seed = _seed(random_state)
        coords = _umap_map(numbers_.matrix, label_arr, n_neighbors, seed)

    data = _page_data(n, k, lists, unavailable, colourings, first, title, seed, label_text, paths,
                      has_images=images is not None, has_texts=texts is not None,
                      has_labels=label_arr is not None, has_hierarchy=hierarchy is not None,
                      has_tokens=tokens is not None, tokens=tokens, has_visits=numbers_.visits is not None,
                      unseen=0 if numbers_.unseen is None else int(numbers_.unseen.sum()), unseen_note=_UNSEEN_NOTE,
                      about=_map_description(embedding is not None, label_arr is not None, n_neighbors),
                      health=health)
    columns = _page_columns(coords, label_arr, label_text, paths, thumbs, text_col, numbers_, colourings, first)
    _write_page(out, _render(columns, data))
    return ExplorerPage(out)


def _map_description(given: bool, has_labels: bool, n_neighbors: Optional[int]) -> str:
    """How the map was made, in a sentence or two, for the page's face."""
    if given:
        return "Map: the coordinates given to explore(embedding=...)."
    if not has_labels:
        return (f"Map: UMAP of 1 − R̂ (the kernel's correlation distance, {n_neighbors} neighbours). "
                "Points close together are inputs whose losses rise and fall together under the posterior.")
    return (f"Map: UMAP of 1 − R̂ with edges between same-label inputs removed ({n_neighbors} neighbours; "
            "the paper's deconfounding, App. B). Each input is placed by its most correlated inputs of "
            "other labels, so label colours mix by design: what groups together shares structure across labels.")


def _health_of(kernel: Any) -> Optional[dict]:
    """The kernel's health report (``metadata["diagnostics"]``, a dict or a HealthReport) as
    {ok, judgeable, problems, notes}, or None when the kernel carries none."""
    metadata = getattr(kernel, "metadata", None)
    report = metadata.get("diagnostics") if isinstance(metadata, MappingABC) else None
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    if not isinstance(report, MappingABC) or "ok" not in report:
        return None
    return {"ok": bool(report["ok"]), "judgeable": bool(report.get("judgeable", True)),
            "problems": [str(p) for p in report.get("problems", [])],
            "notes": [str(x) for x in report.get("notes", [])]}


def _health_html(health: Optional[dict]) -> str:
    """The health report's verdict as the page shows it (escaped; empty without a report)."""
    if health is None:
        return ""
    verdict = ("OK" if health["ok"] else "not judgeable" if not health["judgeable"] else
               f"{len(health['problems'])} problem" + ("s" if len(health["problems"]) != 1 else ""))
    kind = "lk-ok" if health["ok"] else "lk-bad"
    items = "".join(f"<li>{_html_text(p)}</li>" for p in health["problems"])
    items += "".join(f"<li class=\"lk-note\">{_html_text(x)}</li>" for x in health["notes"])
    return (f'<div id="lk-health" class="{kind}"><b>Health report: {verdict}</b>'
            + (f"<ul>{items}</ul>" if items else "") + "</div>")


def _require_page_modules(images: Any) -> None:
    """Bokeh (the page), matplotlib (its colours) and, for images, Pillow — the ``[explore]``
    extra — before any work."""
    for module in ("bokeh", "matplotlib") + (("PIL",) if images is not None else ()):
        require(module, "explore", "explore()")


def _page_data(n, k, lists, unavailable, colourings, first, title, seed, label_text, paths, **flags) -> dict:
    """The page's own JSON: packed neighbour lists, colourings with legends, search terms."""
    return {
        "format": "devinterp_losskernel.explorer", "version": 2, "n": n, "k": k,
        "r_scale": _R_SCALE,
        "neighbours": {
            name: {"indices": _encode(idx.astype(np.uint16 if n <= 65536 else np.int32)),
                   "r": _encode(np.round(np.clip(val, -1, 1) * _R_SCALE).astype(np.int16))}
            for name, (idx, val) in lists.items()
        },
        "unavailable": unavailable,
        "colourings": [{"key": key, "title": t, "legend": legend} for key, (t, _, legend) in colourings.items()],
        "initial": first,
        **flags,
        "scores": [t for key, (t, _, _) in colourings.items() if key.startswith("score")],
        "search_terms": sorted(set(label_text) | {p for s in set(paths) for p in s.split(" › ") if p}),
        "title": title or "Loss kernel explorer",
        "random_state": seed,
    }


def _page_columns(coords, label_arr, label_text, paths, thumbs, text_col, numbers_: _KernelNumbers,
                  colourings, first) -> dict:
    """The Bokeh source's columns: one entry per sample."""
    n = coords.shape[0]
    columns = {
        "x": coords[:, 0], "y": coords[:, 1], "index": np.arange(n),
        "label": label_arr if label_arr is not None else np.full(n, -1),
        "label_name": label_text, "path": paths, "thumb": thumbs, "text": text_col,
        "variance": numbers_.variance,
        "mean_loss": numbers_.mean if numbers_.mean is not None else np.full(n, np.nan),
        "color": list(colourings[first][1]),
    }
    if numbers_.visits is not None:  # a minibatch-mode kernel: visits, and why a variance is missing
        columns["visits"] = numbers_.visits
        columns["variance_text"] = [f"{v:.4f}" if np.isfinite(v) else f"— ({_UNSEEN_NOTE})" for v in numbers_.variance]
    for key, (_, colours, _) in colourings.items():
        columns[f"c_{key}"] = colours
    return columns


def _write_page(out: Path, page: str) -> None:
    """Atomically: a temp file in the same folder, then os.replace; none left on failure."""
    from .validation import atomic_write

    with atomic_write(out, "w", encoding="utf-8") as handle:
        handle.write(page)


def _tooltip(has_images: bool, has_texts: bool, has_labels: bool, has_hierarchy: bool,
             has_tokens: bool = False, has_visits: bool = False) -> str:
    width = 360 if has_tokens else 230
    parts = [f'<div class="lk-tip" style="width:{width}px;font:12px sans-serif">']
    if has_images:
        parts.append('<img class="lk-tip-thumb" src="@thumb" width="64" height="64" '
                     'style="image-rendering:pixelated;float:left;margin:0 6px 2px 0;border:1px solid #ccc"/>')
    if has_texts:
        parts.append('<div class="lk-tip-text" style="font-family:monospace;white-space:pre-wrap;'
                     'max-height:6em;overflow:hidden">@text</div>')
    if has_tokens:  # filled by the page's script from the sequences it stores once (LK.fillTips)
        parts.append('<div class="lk-tip-ctx" data-lk-index="@index"></div>')
    parts.append('<div>#@index')
    if has_labels:
        parts.append(' · <b>@label_name</b>')
    parts.append('</div>')
    if has_hierarchy:
        parts.append('<div style="color:#555;font-size:11px">@path</div>')
    if has_visits:
        parts.append('<div class="lk-tip-variance">K(x,x) = @variance_text</div><div>visits = @visits</div>')
    else:
        parts.append('<div>K(x,x) = @variance{0.0000}</div>')
    parts.append('<div>mean loss = @mean_loss{0.0000}</div><div style="clear:both"></div></div>')
    return "".join(parts)


def _render(columns: dict, data: dict) -> str:
    """The HTML page: a Bokeh WebGL scatter (inline resources) and our panels. Bokeh's
    document and our data are embedded as JSON through :func:`script_json`."""
    from bokeh.embed import json_item
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
                                                            data["has_labels"], data["has_hierarchy"],
                                                            data["has_tokens"], data["has_visits"]))
    hover.callback = CustomJS(code="if (window.LK) LK.hovered(cb_data.index.indices);")
    wheel = WheelZoomTool()
    plot.add_tools(hover, TapTool(renderers=[points]), wheel)
    plot.toolbar.active_scroll = wheel
    source.selected.js_on_change("indices", CustomJS(code="if (window.LK) LK.tapped(cb_obj.indices);"))
    item = json_item(plot, _PLOT_DIV)
    title = _html_text(data["title"])
    return _PAGE.format(title=title, about=_html_text(data["about"]), health=_health_html(data["health"]),
                        resources=Resources(mode="inline", components=["bokeh", "bokeh-gl"]).render(),
                        plot_div=_PLOT_DIV, bokeh_id=_BOKEH_ID, bokeh_item=script_json(item),
                        data_id=_DATA_ID, data=script_json(data), css=_CSS, js=_JS)


def _script_data(text: str, element_id: str, path: Any) -> Any:
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', text, re.S)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a kernel explorer page (no {element_id} data)")
    return json.loads(match.group(1))


def read_explorer(path: Union[str, Path]) -> dict:
    """The data a page embeds, as numpy: ``neighbours`` {variant: (indices, R)}, ``points``
    (the Bokeh source's columns: x, y, colours c_<key>, thumbnails …; ``visits`` and
    ``variance_text`` for a minibatch-mode kernel) and the page's JSON (colourings with legends,
    search terms, ``unavailable`` lists; ``tokens`` for a token-level kernel: ``batch`` [s] the
    stored sequences' batch indices, ``sequences`` [s, T + 1] indices into ``strings`` (the
    distinct ids' texts, ``ids``), ``positions`` [n, 2] (stored sequence, position), as int64)."""
    text = Path(path).read_text(encoding="utf-8")
    data = _script_data(text, _DATA_ID, path)
    data["neighbours"] = {
        name: (_decode(v["indices"]).astype(np.int64), _decode(v["r"]).astype(np.float64) / data["r_scale"])
        for name, v in data["neighbours"].items()
    }
    data["points"] = _bokeh_columns(text, "lk-points", path)
    tokens = data.get("tokens")
    if tokens:
        for key in ("batch", "positions", "sequences"):
            if tokens.get(key) is not None:
                tokens[key] = _decode(tokens[key]).astype(np.int64)
    return data


def _bokeh_columns(text: str, name: str, path: Any = "page") -> dict:
    """The columns of the Bokeh ColumnDataSource called ``name`` in a page's Bokeh document."""
    if f'id="{_BOKEH_ID}"' in text:
        docs = [_script_data(text, _BOKEH_ID, path)["doc"]]
    else:  # pages of format 1: bokeh.embed.components' docs_json, a JS string literal (JSON,
        # HTML-escaped, ' as &#x27;, backslashes doubled; bokeh/embed/elements.py)
        docs = [json.loads(html.unescape(literal.replace("\\\\", "\\")))
                for literal in re.findall(r"const docs_json = '(.*?)';", text, re.S)]
    for doc in docs:
        found = _find_model(doc, name)
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
  <div id="lk-map"><div id="{plot_div}"></div></div>
  <div id="lk-side">
    <h1 id="lk-title">{title}</h1>
    <div id="lk-about">{about}</div>
    {health}
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
<script type="application/json" id="{bokeh_id}">{bokeh_item}</script>
<script>{js}</script>
</body>
</html>
"""

_CSS = """
body{margin:0;font:13px/1.35 system-ui,sans-serif;color:#222}
#lk-app{display:flex;gap:12px;padding:8px}
#lk-side{width:380px;flex:none}
#lk-title{font-size:16px;margin:4px 0 6px}
#lk-about{font-size:12px;color:#444;margin:0 0 8px}
#lk-health{font-size:12px;margin:0 0 8px;padding:4px 6px;border-radius:3px;max-height:160px;overflow:auto}
#lk-health ul{margin:2px 0 0 16px;padding:0}
#lk-health.lk-ok{background:#e6f4ea;border-left:4px solid #1a7f37}
#lk-health.lk-bad{background:#fdecea;border-left:4px solid #c62828}
#lk-health .lk-note{color:#555}
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
.lk-card.lk-tok-card{width:auto;flex:1 1 100%;text-align:left}
.lk-unseen{color:#8a6d00}
#lk-selected{margin:8px 0 6px}
#lk-selected img{width:96px;height:96px;image-rendering:pixelated;float:left;margin-right:8px}
"""

_JS = r"""
(function(){
"use strict";
const LK = window.LK = {ready:false, mode:"most", hideSame:false, selected:null, hover:null};
const data = JSON.parse(document.getElementById("lk-data").textContent);
Bokeh.embed.embed_item(JSON.parse(document.getElementById("lk-bokeh").textContent), "lk-plot");
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
function esc(s){
  return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
}
LK.neighbours = function(i){  // null when the page holds no list for this view (never another list)
  const variant = LK.mode + (LK.hideSame && data.has_labels ? "_other" : "");
  const v = LK.nbrs[variant];
  if (!v) return null;
  const k = v.idx.k, out = [];
  for (let j = 0; j < k; j++) out.push({index:v.idx.values[i*k+j], r:v.r.values[i*k+j]/data.r_scale});
  return out;
};
function model(name){ return LK.doc.get_model_by_name(name); }
// a token-level kernel: each row is (sequence, position) into sequences stored once, as indices
// into one list of token strings; every string reaches the DOM as text (textContent), never HTML
const tk = data.tokens || null;
LK.tokens = tk && {pos:decode(tk.positions), batch:tk.batch && decode(tk.batch),
                   seq:tk.sequences && decode(tk.sequences)};
function shown(s){ return s === "" ? "\u2205" : String(s).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
// inline styles: Bokeh's tooltip lives in a shadow root, where the page's CSS does not reach
const TOKEN_STYLE = {
  "lk-ctx": "font-family:monospace;font-size:12px;line-height:1.8;white-space:normal;word-break:break-all;margin:2px 0",
  "lk-tok": "white-space:pre;background:#eeeeee;border-radius:2px;padding:0 1px;margin-right:2px",
  "lk-tok-target": "background:#ffd54f;outline:2px solid #d62728;font-weight:bold",
  "lk-tok-after": "opacity:.4",
  "lk-ctx-cut": "color:#888",
  "lk-ctx-where": "font-family:system-ui,sans-serif;font-size:11px;color:#555;line-height:1.3"};
function el(tag, cls, text){
  const e = document.createElement(tag);
  if (cls){ e.className = cls; e.style.cssText = cls.split(" ").map(c => TOKEN_STYLE[c] || "").join(";"); }
  if (text != null) e.textContent = text;
  return e;
}
LK.tokenContext = function(i, before, after){  // {batch, position, tokens:[{id, text, target, after}], cut}
  const t = LK.tokens, s = t.pos.values[2*i], p = t.pos.values[2*i + 1];
  const out = {batch:t.batch ? t.batch.values[s] : s, position:p, tokens:[], cutLeft:false, cutRight:false};
  if (!t.seq) return out;
  const width = t.seq.k, lo = Math.max(0, p - before), hi = Math.min(width - 1, p + after);
  out.cutLeft = lo > 0; out.cutRight = hi < width - 1;
  for (let j = lo; j <= hi; j++){
    const c = t.seq.values[s*width + j];
    out.tokens.push({id:tk.ids[c], text:tk.strings[c], target:j == p, after:j > p});
  }
  return out;
};
LK.tokenNode = function(i, before, after){
  const c = LK.tokenContext(i, before, after), box = el("div", "lk-ctx");
  box.dataset.index = i;
  if (c.cutLeft) box.append(el("span", "lk-ctx-cut", "\u2026 "));
  for (const t of c.tokens){
    const span = el("span", "lk-tok" + (t.target ? " lk-tok-target" : "") + (t.after ? " lk-tok-after" : ""),
                    shown(t.text));
    span.title = "id " + t.id;
    box.append(span);
  }
  if (c.cutRight) box.append(el("span", "lk-ctx-cut", " \u2026"));
  const target = c.tokens.find(t => t.target);
  box.append(el("div", "lk-ctx-where", "sequence " + c.batch + ", position " + c.position
                + (target && tk.strings.length ? " (id " + target.id + ")" : "")));
  return box;
};
LK.targetText = function(i){  // the string of row i's target token ("" without input_ids)
  const t = LK.tokens;
  if (!t || !t.seq) return "";
  return tk.strings[t.seq.values[t.pos.values[2*i] * t.seq.k + t.pos.values[2*i + 1]]];
};
function deepAll(root, sel, out){
  for (const e of root.querySelectorAll(sel)) out.push(e);
  for (const e of root.querySelectorAll("*")) if (e.shadowRoot) deepAll(e.shadowRoot, sel, out);
  return out;
}
LK.fillTips = function(){  // Bokeh renders the tooltip from its template; the context goes in after
  if (!LK.tokens) return;
  for (const slot of deepAll(document, ".lk-tip-ctx", [])){
    if (slot.dataset.lkFilled == slot.dataset.lkIndex) continue;
    slot.replaceChildren(LK.tokenNode(Number(slot.dataset.lkIndex), tk.window[0], tk.window[1]));
    slot.dataset.lkFilled = slot.dataset.lkIndex;
  }
};
function varianceHtml(d, i){
  const v = Number(d.variance[i]);
  return '<div>K(x,x) = ' + (isFinite(v) ? v.toExponential(3)
         : '<span class="lk-unseen">\u2014 (' + esc(data.unseen_note || "no value") + ')</span>') + '</div>'
    + (data.has_visits ? '<div>visits = ' + Number(d.visits[i]) + '</div>' : '');
}
function thumbHtml(d, i, cls){
  if (data.has_images && d.thumb[i]) return '<img class="'+cls+'" src="'+d.thumb[i]+'" alt="#'+i+'">';
  if (data.has_tokens){
    const w = cls == "lk-sel-thumb" ? tk.window : tk.card_window;
    return LK.tokenNode(i, w[0], w[1]).outerHTML;  // built from text nodes: the browser escapes it
  }
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
  const d = LK.source.data, listed = LK.neighbours(i), nb = listed || [];
  sel.innerHTML = thumbHtml(d, i, "lk-sel-thumb") + '<div><b>#'+i+'</b>'
    + (data.has_labels ? ' · '+esc(d.label_name[i]) : '') + '</div>'
    + (data.has_hierarchy ? '<div style="font-size:11px;color:#555">'+esc(d.path[i])+'</div>' : '')
    + varianceHtml(d, i)
    + '<div>'+(LK.mode == "most" ? "most" : "least")+' correlated'
    + (LK.hideSame ? ', other labels only' : '')+':</div>'
    + (listed ? '' : '<div class="lk-none">this page holds no such list'
                     + (data.unavailable && data.unavailable[LK.mode + "_other"]
                        ? ': '+esc(data.unavailable[LK.mode + "_other"]) : '')
                     + '</div>')
    + '<div style="clear:both"></div>';
  strip.innerHTML = nb.map(o => '<div class="lk-card'+(data.has_tokens ? ' lk-tok-card' : '')
    + '" data-index="'+o.index+'" data-r="'+o.r+'">'
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
LK.hovered = function(indices){
  LK.hover = (indices && indices.length) ? indices[0] : null;
  if (LK.tokens){ LK.fillTips(); requestAnimationFrame(LK.fillTips); }
};
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
    leg.innerHTML = '<div class="lk-bar" style="background:linear-gradient(to right,'
      + c.legend.stops.join(",") + ')"></div>'
      + '<div class="lk-bar-labels"><span>'+Number(c.legend.min).toPrecision(3)+'</span><span>'
      + esc(c.title) + '</span><span>'+Number(c.legend.max).toPrecision(3)+'</span></div>'
      + (c.legend.missing ? '<div class="lk-legend-item lk-legend-missing"><span class="lk-swatch" '
                            + 'style="background:#bbbbbb"></span>'
                            + esc(c.legend.missing_label || 'no value (NaN/Inf)') + ': '
                            + Number(c.legend.missing) + ' of ' + data.n + '</div>' : '');
  }
};
LK.search = function(query){
  const found = model("lk-found"), d = LK.source.data, q = String(query || "").trim().toLowerCase();
  const status = document.getElementById("lk-search-status");
  if (!q){ found.data = {x:[], y:[]}; status.textContent = ""; LK.found = []; return []; }
  const exact = [], partial = [];
  for (let i = 0; i < d.x.length; i++){
    const parts = [String(d.label_name[i]).toLowerCase()].concat(
      data.has_hierarchy ? String(d.path[i]).toLowerCase().split(" › ") : [],
      LK.tokens && LK.tokens.seq ? [LK.targetText(i).trim().toLowerCase()] : []);
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
  if (!(window.Bokeh && Bokeh.documents && Bokeh.documents.length
        && Bokeh.documents[0].get_model_by_name("lk-points"))){
    return setTimeout(init, 20);
  }
  LK.doc = Bokeh.documents[0];
  LK.source = model("lk-points"); LK.plot = model("lk-map");
  if (!Bokeh.index.find_one(LK.plot)) return setTimeout(init, 20);
  const select = document.getElementById("lk-color");
  select.innerHTML = data.colourings.map(c => '<option value="'+esc(c.key)+'">'+esc(c.title)+'</option>').join("");
  select.addEventListener("change", () => LK.colourBy(select.value));
  let terms = data.search_terms;
  if (tk && tk.strings.length <= 5000)  // a token-level kernel: its target tokens are search terms too
    terms = [...new Set(terms.concat(tk.strings.map(t => t.trim()).filter(t => t)))];
  document.getElementById("lk-terms").innerHTML = terms.map(t => '<option value="'+esc(t)+'">').join("");
  const input = document.getElementById("lk-search");
  if (tk && tk.sequences) input.placeholder = data.has_hierarchy ? "label, WordNet node or token" : "label or token";
  input.addEventListener("input", () => LK.search(input.value));
  document.getElementById("lk-search-clear").addEventListener("click", () => { input.value = ""; LK.search(""); });
  for (const r of document.querySelectorAll('input[name="lk-mode"]'))
    r.addEventListener("change", () => { LK.mode = r.value; LK.render(); });
  if (!LK.nbrs.least) for (const el of [document.getElementById("lk-least")]) el.disabled = true;
  const hide = document.getElementById("lk-hide-same");
  hide.disabled = !(data.has_labels && (LK.nbrs.most_other || LK.nbrs.least_other));
  if (hide.disabled && data.unavailable && Object.keys(data.unavailable).length)
    hide.parentElement.title = Object.values(data.unavailable)[0];
  hide.addEventListener("change", () => { LK.hideSame = hide.checked; LK.render(); });
  LK.colourBy(data.initial);
  LK.ready = true;
  document.body.dataset.lkReady = "1";
}
if (document.readyState == "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
"""

