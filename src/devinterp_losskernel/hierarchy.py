"""Label hierarchies (trees) for the hierarchy analyses: WordNet for ImageNet, Fashion-MNIST.

The paper (Section 4, Appendix D.2) compares the loss kernel with the ImageNet–WordNet
hierarchy: samples are coloured and sorted by their label's position in the tree, the
correlation matrix is set beside the tree-distance matrix, and the *taxonomic lift* counts
how often kernel neighbours share an ancestor at depth d'. All of that needs a **tree**:
one root, one parent per node, ``depth(root) = 0``.

:class:`Hierarchy` is that tree. Build one

* from any ``child → parent`` mapping with :meth:`Hierarchy.from_parents`;
* for ImageNet-1k with :func:`wordnet_imagenet` (nodes are WordNet 3.0 noun ids, *wnids*,
  ``"n01440764"`` = ``"n"`` + the synset's 8-digit offset in ``data.noun``);
* for Fashion-MNIST with :func:`fashion_mnist_hierarchy`.

WordNet is a DAG, not a tree
----------------------------
About 3% of noun synsets (2,213 of 82,115) have more than one hypernym, e.g.
``dog.n.01`` is both a ``canine.n.02`` and a ``domestic_animal.n.01``; 38 of the
ImageNet-1k classes or their ancestors do. We keep **one parent per synset: the hypernym
with the longest path to ``entity.n.01``** (``hypernym_path="longest"``, the default;
instance hypernyms count as hypernyms; ties go to the hypernym listed first in WordNet's
data file). Because the choice is made per synset, the ancestors of every node form one
consistent chain, and a node's depth equals nltk's ``Synset.max_depth()``. Why the longest:

* it is the most specific chain (every intermediate category kept), so the lift's depth
  axis d' has the finest resolution, and two classes meet at their most specific common
  category along it;
* the short cuts it avoids are coarse functional categories high in the tree: the
  shortest path hangs ``dog`` (and with it 121 classes) from ``animal → domestic_animal``
  at depth 8 instead of ``… mammal → placental → carnivore → canine`` at depth 13,
  cutting the dogs off from the other mammals — the biological taxonomy the paper's UMAP
  (dogs → other mammals → birds → reptiles …) and lift curves are read against;
* it is a property of WordNet alone. "The first hypernym path" is not: nltk stores a
  synset's pointers in a set, so ``hypernyms()[0]`` and ``hypernym_paths()[0]`` change
  with Python's hash seed from one process to the next.

``hypernym_path="first"`` (the hypernym listed first in the data file, read from the file
itself; differs from the longest for 90 of the 1000 classes, mostly ``artifact →
covering`` instead of ``→ commodity``) and ``"shortest"`` (284 classes differ) are
available for comparison.

WordNet data
------------
:func:`ensure_wordnet` finds WordNet 3.0 for nltk: nltk's own data (``nltk.download``), or
Debian/Ubuntu's package ``wordnet-base`` (``/usr/share/wordnet``), which nltk cannot read
as installed (it lacks ``lexnames``, and nltk only reads corpora below its data path);
the files are then copied once into an nltk-data folder with a generated ``lexnames``.
"""

from __future__ import annotations

import numbers
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .extras import require

__all__ = [
    "DEBIAN_WORDNET_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_WORDNET",
    "Hierarchy",
    "LEXNAMES",
    "NLTK_DATA_ENV",
    "WordNetNotFoundError",
    "ensure_wordnet",
    "fashion_mnist_hierarchy",
    "imagenet_class_names",
    "imagenet_wnids",
    "wordnet_available",
    "wordnet_imagenet",
]

#: where Debian/Ubuntu's ``wordnet-base`` installs the WordNet 3.0 database
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
#: environment variable naming the nltk-data folder :func:`ensure_wordnet` writes to
NLTK_DATA_ENV = "LOSSKERNEL_NLTK_DATA"
_DEFAULT_NLTK_DATA = Path("~/.cache/devinterp_losskernel/nltk_data")

#: The 45 WordNet lexicographer files, numbered 00–44 (WordNet 3.0, ``lexnames(5WN)``).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon",
    "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception",
    "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
# syntactic category codes of lexnames(5WN): 1 noun, 2 verb, 3 adjective, 4 adverb
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# the database files nltk's WordNetCorpusReader opens (index.sense is optional, see below)
_WORDNET_FILES = (
    "data.noun", "data.verb", "data.adj", "data.adv",
    "index.noun", "index.verb", "index.adj", "index.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc", "cntlist.rev",
)
_MARKER = ".devinterp_losskernel"

_INSTALL_HELP = (
    "WordNet 3.0 is needed for the WordNet hierarchy. Install it with one of:\n"
    "  * Debian/Ubuntu:  sudo apt-get install wordnet-base   (files in /usr/share/wordnet;\n"
    "    devinterp_losskernel.hierarchy.ensure_wordnet() then makes them readable by nltk)\n"
    "  * with internet:  python -c \"import nltk; nltk.download('wordnet')\""
)


class WordNetNotFoundError(LookupError):
    """Neither nltk's WordNet nor Debian's ``wordnet-base`` files are on this machine."""


# ---------------------------------------------------------------------------------------------
# WordNet data
# ---------------------------------------------------------------------------------------------
def _loaded_nltk_wordnet():
    """nltk's WordNet reader if nltk can load it as things stand, else None."""
    import nltk
    from nltk.corpus import wordnet

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:  # an nltk_data 'wordnet.zip' is found under this name by some nltk versions
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            return None
    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError):
        return None
    return wordnet


def _default_data_dir() -> Path:
    return Path(os.environ.get(NLTK_DATA_ENV) or _DEFAULT_NLTK_DATA).expanduser()


def _lexnames_text() -> str:
    """``lexnames`` as WordNet ships it: "NN<TAB>name<TAB>category" per line."""
    return "".join(
        f"{number:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
        for number, name in enumerate(LEXNAMES)
    )


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _WORDNET_FILES + ("lexnames", "index.sense"))


def _build_nltk_layout(source: Path, target: Path) -> None:
    """Copy the Debian database into ``target`` (= <data_dir>/corpora/wordnet), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in _WORDNET_FILES:
            shutil.copyfile(source / name, staging / name)
        (staging / "lexnames").write_text(_lexnames_text())
        # nltk reads index.sense (sense key → synset) when it opens WordNet. Debian ships it
        # in the separate package wordnet-sense-index; without it an empty file lets nltk
        # open the database, and only sense-key look-ups (wn.lemma_from_key) are unavailable.
        if (source / "index.sense").is_file():
            shutil.copyfile(source / "index.sense", staging / "index.sense")
        else:
            (staging / "index.sense").write_text("")
        (staging / _MARKER).write_text(f"copied from {source} by devinterp_losskernel\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the copy may be a shared nltk_data
        try:
            os.replace(staging, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def wordnet_available(source_dir: Union[str, Path, None] = None) -> bool:
    """True if :func:`ensure_wordnet` can succeed: nltk already finds WordNet, or the Debian
    files are in ``source_dir`` (default ``/usr/share/wordnet``). Changes nothing."""
    if _loaded_nltk_wordnet() is not None:
        return True
    source = Path(source_dir) if source_dir is not None else DEBIAN_WORDNET_DIR
    if all((source / name).is_file() for name in _WORDNET_FILES):
        return True
    target = _default_data_dir() / "corpora" / "wordnet"
    return _is_complete(target)


def ensure_wordnet(data_dir: Union[str, Path, None] = None, *,
                   source_dir: Union[str, Path, None] = None):
    """Make WordNet 3.0 loadable by nltk and return nltk's reader (``nltk.corpus.wordnet``).

    1. If nltk already loads WordNet (e.g. after ``nltk.download('wordnet')``), use it.
    2. Else, if ``<data_dir>/corpora/wordnet`` holds a complete copy, add ``data_dir`` to
       ``nltk.data.path``.
    3. Else copy Debian's ``wordnet-base`` files from ``source_dir`` into
       ``<data_dir>/corpora/wordnet/``, write the ``lexnames`` file nltk needs (the 45
       lexicographer files of :data:`LEXNAMES`), and add ``data_dir`` to ``nltk.data.path``.

    Args:
        data_dir: an nltk-data folder to write to; default ``$LOSSKERNEL_NLTK_DATA`` or
            ``~/.cache/devinterp_losskernel/nltk_data``.
        source_dir: the WordNet database files; default ``/usr/share/wordnet``.

    Returns:
        nltk's ``WordNetCorpusReader`` (loaded).

    Raises:
        WordNetNotFoundError: neither source exists; the message says how to install one.
    """
    import nltk

    reader = _loaded_nltk_wordnet()
    if reader is not None:
        return reader
    data_dir = Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()
    source = Path(source_dir) if source_dir is not None else DEBIAN_WORDNET_DIR
    target = data_dir / "corpora" / "wordnet"
    if not _is_complete(target):
        missing = [name for name in _WORDNET_FILES if not (source / name).is_file()]
        if missing:
            where = "does not exist" if not source.is_dir() else f"lacks {', '.join(missing)}"
            raise WordNetNotFoundError(
                f"nltk cannot load WordNet, and the WordNet source_dir {source} {where}.\n"
                + _INSTALL_HELP
            )
        if target.exists():
            if not (target / _MARKER).exists():
                raise WordNetNotFoundError(
                    f"data_dir {data_dir} has an incomplete corpora/wordnet that this package did "
                    f"not write; remove it or pass another data_dir.\n" + _INSTALL_HELP
                )
            shutil.rmtree(target)
        _build_nltk_layout(source, target)
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))
    reader = _loaded_nltk_wordnet()
    if reader is None:
        raise WordNetNotFoundError(
            f"nltk could not load the WordNet copy in {target}.\n" + _INSTALL_HELP
        )
    return reader


# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------
class Hierarchy:
    """A rooted tree over label nodes; ``depth(root) = 0``.

    Nodes are any hashable names (WordNet trees use wnids such as ``"n02084071"``).
    Data labels are matched to nodes by :meth:`node_of`: a label that is a node name is that
    node; an integer label ``i`` is ``classes[i]`` when the hierarchy has a ``classes`` list
    (ImageNet: class index → wnid). Classes may be leaves or internal nodes.

    Methods that take a node also accept a class index (``depth(0)`` is the depth of
    ``classes[0]``). Build with :meth:`from_parents` (or :func:`wordnet_imagenet`,
    :func:`fashion_mnist_hierarchy`). ``source`` says where the tree came from.
    """

    def __init__(self, parents: Mapping[Hashable, Optional[Hashable]], *,
                 classes: Optional[Sequence[Hashable]] = None,
                 names: Optional[Mapping[Hashable, str]] = None,
                 source: str = "from_parents"):
        if not isinstance(parents, Mapping):
            raise ValueError(f"mapping must be a dict child → parent, got {type(parents).__name__}")
        if not parents:
            raise ValueError("mapping must not be empty (child → parent)")
        # every node: children and parents, in first-seen order (this fixes the leaf order)
        nodes: "OrderedDict[Hashable, None]" = OrderedDict()
        for child, parent in parents.items():
            for node in (child, parent):
                if node is None:
                    continue
                try:
                    hash(node)
                except TypeError:
                    raise ValueError(f"mapping nodes must be hashable, got {node!r}") from None
                nodes.setdefault(node, None)
        self._nodes: List[Hashable] = list(nodes)
        self._index: Dict[Hashable, int] = {node: i for i, node in enumerate(self._nodes)}
        parent_idx = np.full(len(self._nodes), -1, dtype=np.int64)
        for child, parent in parents.items():
            if parent is None:
                continue
            if parent == child:
                raise ValueError(f"mapping has a cycle: {child!r} is its own parent")
            parent_idx[self._index[child]] = self._index[parent]
        roots = [self._nodes[i] for i in np.flatnonzero(parent_idx < 0)]
        if not roots:
            raise ValueError("mapping has a cycle: every node has a parent, so there is no root")
        if len(roots) != 1:
            shown = roots[:10]
            raise ValueError(
                f"mapping must describe one tree with a single root (a node without a parent), "
                f"got {len(roots)} roots: {shown}{' …' if len(roots) > 10 else ''}"
            )
        self._parent = parent_idx
        self._root = self._index[roots[0]]
        self._depth = self._compute_depths()
        self._children: List[List[int]] = [[] for _ in self._nodes]
        for i, p in enumerate(parent_idx):
            if p >= 0:
                self._children[p].append(i)
        self._preorder = self._compute_preorder()
        self._names = {} if names is None else {k: str(v) for k, v in names.items()}
        self.source = source
        self._classes: Optional[List[Hashable]] = None
        if classes is not None:
            classes = list(classes)
            unknown = [c for c in classes if c not in self._index]
            if unknown:
                raise ValueError(f"classes must be nodes of the tree; not found: {unknown[:10]}")
            if len(set(classes)) != len(classes):
                raise ValueError("classes must not repeat a node")
            self._classes = classes

    def _compute_depths(self) -> np.ndarray:
        """Depth of every node; a ValueError naming a cycle if some node never reaches the root."""
        depth = np.full(len(self._nodes), -1, dtype=np.int64)
        depth[self._root] = 0
        for start in range(len(self._nodes)):
            chain = []
            node = start
            seen = set()
            while depth[node] < 0:
                if node in seen:
                    cycle = [self._nodes[i] for i in chain[chain.index(node):]]
                    raise ValueError(f"mapping has a cycle: {' → '.join(map(repr, cycle))} → {cycle[0]!r}")
                seen.add(node)
                chain.append(node)
                node = self._parent[node]
            for offset, member in enumerate(reversed(chain), start=1):
                depth[member] = depth[node] + offset
        return depth

    def _compute_preorder(self) -> np.ndarray:
        order, stack = [], [self._root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self._children[node]))
        return np.asarray(order, dtype=np.int64)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_parents(cls, mapping: Mapping[Hashable, Optional[Hashable]], *,
                     classes: Optional[Sequence[Hashable]] = None,
                     names: Optional[Mapping[Hashable, str]] = None) -> "Hierarchy":
        """A tree from ``{child: parent}``; the root is the one node without a parent (it may
        appear only as a parent, or as a child mapped to ``None``).

        Args:
            mapping: child → parent for every non-root node. Children are ordered as the
                mapping lists them (this fixes :meth:`leaf_order`).
            classes: optional class nodes in class-index order, so integer labels
                ``0..len(classes)-1`` resolve to nodes.
            names: optional display names ``{node: str}``.

        Raises:
            ValueError: several roots or none, a cycle, unhashable nodes, unknown classes.

        >>> h = Hierarchy.from_parents({"cat": "animal", "dog": "animal", "animal": "thing",
        ...                             "car": "thing"})
        >>> h.depth("thing"), h.depth("dog"), h.lowest_common_ancestor("dog", "car")
        (0, 2, 'thing')
        """
        return cls(mapping, classes=classes, names=names, source="from_parents")

    # -- basic queries ------------------------------------------------------------------------
    def _idx(self, node: Hashable, name: str = "node") -> int:
        """Index of a node, or of the class a class-index label names."""
        try:
            return self._index[node]
        except (KeyError, TypeError):
            pass
        try:
            return self._index[self.node_of(node)]
        except (ValueError, TypeError):
            raise ValueError(f"{name} {node!r} is not a node (or class index) of this hierarchy") from None

    @property
    def root(self) -> Hashable:
        return self._nodes[self._root]

    @property
    def nodes(self) -> List[Hashable]:
        """All nodes, in depth-first pre-order from the root."""
        return [self._nodes[i] for i in self._preorder]

    @property
    def classes(self) -> Optional[List[Hashable]]:
        """Class nodes in class-index order (integer label i ↔ classes[i]), or None."""
        return None if self._classes is None else list(self._classes)

    @property
    def max_depth(self) -> int:
        return int(self._depth.max())

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: Hashable) -> bool:
        try:
            return node in self._index
        except TypeError:
            return False

    def __repr__(self) -> str:
        n_classes = "" if self._classes is None else f", {len(self._classes)} classes"
        return (f"Hierarchy({len(self._nodes)} nodes{n_classes}, root={self.root!r}, "
                f"max_depth={self.max_depth}, source={self.source!r})")

    def name(self, node: Hashable) -> str:
        """A display name: ``names[node]`` if given, else ``str(node)``."""
        node = self._nodes[self._idx(node)]
        return self._names.get(node, str(node))

    def parent(self, node: Hashable) -> Optional[Hashable]:
        p = self._parent[self._idx(node)]
        return None if p < 0 else self._nodes[p]

    def children(self, node: Hashable) -> List[Hashable]:
        return [self._nodes[c] for c in self._children[self._idx(node)]]

    def is_leaf(self, node: Hashable) -> bool:
        return not self._children[self._idx(node)]

    def leaves(self) -> List[Hashable]:
        """Nodes without children, in depth-first order."""
        return [self._nodes[i] for i in self._preorder if not self._children[i]]

    def depth(self, node: Hashable) -> int:
        """Edges from the root to ``node`` (the root has depth 0)."""
        return int(self._depth[self._idx(node)])

    def ancestors(self, node: Hashable, *, include_self: bool = False) -> List[Hashable]:
        """``node``'s ancestors from its parent up to the root (nearest first)."""
        i = self._idx(node)
        chain = [i] if include_self else []
        p = self._parent[i]
        while p >= 0:
            chain.append(p)
            p = self._parent[p]
        return [self._nodes[j] for j in chain]

    def path(self, node: Hashable) -> List[Hashable]:
        """Root → ``node``, inclusive; ``path(node)[d]`` is the ancestor at depth d."""
        return self.ancestors(node, include_self=True)[::-1]

    def ancestor_at_depth(self, node: Hashable, depth: int) -> Hashable:
        """The ancestor of ``node`` at ``depth`` (``node`` itself if it is not deeper)."""
        chain = self.path(node)
        return chain[min(int(depth), len(chain) - 1)]

    def lowest_common_ancestor(self, a: Hashable, b: Hashable) -> Hashable:
        """The deepest node that is an ancestor of (or equal to) both ``a`` and ``b``."""
        i, j = self._idx(a, "a"), self._idx(b, "b")
        while self._depth[i] > self._depth[j]:
            i = self._parent[i]
        while self._depth[j] > self._depth[i]:
            j = self._parent[j]
        while i != j:
            i, j = self._parent[i], self._parent[j]
        return self._nodes[i]

    def distance(self, a: Hashable, b: Hashable) -> int:
        """Tree distance (edges): depth(a) + depth(b) − 2·depth(lca(a, b))."""
        lca = self.lowest_common_ancestor(a, b)
        return self.depth(a) + self.depth(b) - 2 * self.depth(lca)

    def to_parents(self) -> Dict[Hashable, Hashable]:
        """``{child: parent}`` for every non-root node (round-trips through from_parents)."""
        return {self._nodes[i]: self._nodes[self._parent[i]] for i in self._preorder
                if self._parent[i] >= 0}

    def to_text(self, max_lines: int = 200) -> str:
        """An indented outline of the tree (display names), depth-first."""
        lines = []
        for i in self._preorder[:max_lines]:
            node = self._nodes[i]
            marker = " *" if self._classes is not None and node in self._class_set() else ""
            lines.append("  " * int(self._depth[i]) + self._names.get(node, str(node)) + marker)
        if len(self._preorder) > max_lines:
            lines.append(f"… ({len(self._preorder) - max_lines} more nodes)")
        return "\n".join(lines)

    def _class_set(self) -> set:
        return set(self._classes or ())

    # -- labels -------------------------------------------------------------------------------
    def node_of(self, label: Any) -> Hashable:
        """The node for a data label: the node of that name, or ``classes[label]`` for an
        integer label when the hierarchy has classes. ValueError if neither."""
        if isinstance(label, np.generic):
            label = label.item()
        if label in self:
            return label
        if (self._classes is not None and isinstance(label, numbers.Integral)
                and not isinstance(label, bool) and 0 <= label < len(self._classes)):
            return self._classes[int(label)]
        hint = "" if self._classes is None else f" (and not a class index in [0, {len(self._classes)}))"
        raise ValueError(f"labels: the hierarchy has no node for label {label!r}{hint}")

    def _label_nodes(self, labels: Any, name: str = "labels") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unique labels, inverse [m], node index per unique label) with errors naming ``name``."""
        arr = _as_label_array(labels, name)
        try:
            uniques, inverse = np.unique(arr, return_inverse=True)
        except TypeError as error:
            raise ValueError(f"{name} must be comparable values (not mixed types): {error}") from None
        node_idx = np.empty(len(uniques), dtype=np.int64)
        missing = []
        for u, value in enumerate(uniques):
            try:
                node_idx[u] = self._index[self.node_of(value)]
            except ValueError:
                missing.append(value.item() if isinstance(value, np.generic) else value)
        if missing:
            raise ValueError(
                f"{name}: the hierarchy has no node for {len(missing)} label(s): {missing[:10]}"
                + ("" if self._classes is None else
                   f" (integer labels index the hierarchy's {len(self._classes)} classes)")
            )
        return uniques, inverse.reshape(-1), node_idx

    def nodes_of(self, labels: Any) -> List[Hashable]:
        """:meth:`node_of` for each label, [m]."""
        _, inverse, node_idx = self._label_nodes(labels)
        return [self._nodes[node_idx[u]] for u in inverse]

    def depths(self, labels: Any) -> np.ndarray:
        """Depth of each label's node, int64 [m]."""
        _, inverse, node_idx = self._label_nodes(labels)
        return self._depth[node_idx][inverse]

    def ancestors_at_depth(self, labels: Any, depth: int) -> np.ndarray:
        """Each label's ancestor at ``depth`` (the label's own node if it is shallower),
        object array [m] — e.g. ``groups`` for :func:`~devinterp_losskernel.analysis.attribute_lift`."""
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        _, inverse, node_idx = self._label_nodes(labels)
        paths = self._paths(node_idx)
        column = np.minimum(int(depth), self._depth[node_idx])
        chosen = paths[np.arange(len(node_idx)), column]
        out = np.empty(len(inverse), dtype=object)
        out[:] = [self._nodes[chosen[u]] for u in inverse]
        return out

    def _paths(self, node_idx: np.ndarray) -> np.ndarray:
        """Root-to-node index paths, [u, max_depth + 1], padded with −1 beyond each node."""
        depth = self._depth[node_idx]
        paths = np.full((len(node_idx), int(depth.max(initial=0)) + 1), -1, dtype=np.int64)
        current = node_idx.copy()
        for level in range(paths.shape[1] - 1, -1, -1):
            here = depth >= level
            paths[here, level] = current[here]
            step = here & (depth > 0)
            current[step] = np.where(self._parent[current[step]] >= 0,
                                     self._parent[current[step]], current[step])
        return paths

    def _lca_depths(self, node_idx: np.ndarray, block: int = 256) -> np.ndarray:
        """depth(lca(a, b)) for all pairs of the given nodes, int64 [u, u]."""
        paths = self._paths(node_idx)
        u = len(node_idx)
        out = np.empty((u, u), dtype=np.int64)
        for start in range(0, u, block):
            p = paths[start:start + block]
            same = (p[:, None, :] == paths[None, :, :]) & (p[:, None, :] >= 0)
            # the common prefix of two root paths ends at their lowest common ancestor
            out[start:start + block] = np.cumprod(same, axis=2).sum(axis=2) - 1
        return out

    def lca_depth_matrix(self, labels: Any) -> np.ndarray:
        """depth(lca(y_a, y_b)) for every pair of labels, int64 [m, m]."""
        _, inverse, node_idx = self._label_nodes(labels)
        return self._lca_depths(node_idx)[np.ix_(inverse, inverse)]

    def distance_matrix(self, labels: Any) -> np.ndarray:
        """Tree distance between labels, [m, m] int32:
        D[a, b] = depth(y_a) + depth(y_b) − 2·depth(lca(y_a, y_b)); 0 for equal labels.

        ``labels`` may be per-sample labels (→ the n × n matrix to set beside the kernel,
        the paper's Fig. 1B) or a list of classes.
        """
        _, inverse, node_idx = self._label_nodes(labels)
        depth = self._depth[node_idx]
        small = depth[:, None] + depth[None, :] - 2 * self._lca_depths(node_idx)
        return small.astype(np.int32)[np.ix_(inverse, inverse)]

    def leaf_order(self) -> List[Hashable]:
        """The classes (or, without classes, the leaves) in depth-first order of the tree:
        the order for sorting and colouring labels, so nearby categories sit together."""
        if self._classes is None:
            return self.leaves()
        wanted = self._class_set()
        return [self._nodes[i] for i in self._preorder if self._nodes[i] in wanted]

    def positions(self, labels: Any) -> np.ndarray:
        """Each label's position in :meth:`leaf_order`, scaled to [0, 1), float64 [m]: the
        i-th of N ordered classes ↦ i / N. (If a label is not in the leaf order — an
        internal node of a tree without classes — all nodes are ranked depth-first instead.)"""
        _, inverse, node_idx = self._label_nodes(labels)
        order = self.leaf_order()
        rank = {self._index[node]: i for i, node in enumerate(order)}
        if all(i in rank for i in node_idx):
            pos = np.array([rank[i] for i in node_idx], dtype=np.float64) / len(order)
        else:  # a label that is not among the classes/leaves: rank all nodes instead
            full = np.empty(len(self._nodes), dtype=np.int64)
            full[self._preorder] = np.arange(len(self._nodes))
            pos = full[node_idx] / len(self._nodes)
        return pos[inverse]

    def sample_order(self, labels: Any) -> np.ndarray:
        """Indices that sort samples by their label's position in the tree (stable), [m];
        e.g. ``R[np.ix_(o, o)]`` for the hierarchy-sorted correlation matrix."""
        return np.argsort(self.positions(labels), kind="stable")

    def position_colors(self, labels: Any, cmap: str = "hsv") -> np.ndarray:
        """An RGBA colour per label from its position in :meth:`leaf_order` (paper, Fig. 1A:
        nearby categories get similar hues), float64 [m, 4]. ``cmap`` is a matplotlib
        colormap name; a cyclic one (``"hsv"``, ``"twilight"``) suits the ordering (matplotlib:
        the ``[plot]`` extra)."""
        colormaps = require("matplotlib", "plot", "Hierarchy.position_colors").colormaps

        try:
            colormap = colormaps[cmap]
        except KeyError:
            raise ValueError(f"cmap must be a matplotlib colormap name, got {cmap!r}") from None
        return np.asarray(colormap(self.positions(labels)), dtype=np.float64)


def _as_label_array(labels: Any, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} must be given, got None")
    try:
        import torch

        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(labels)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


# ---------------------------------------------------------------------------------------------
# WordNet trees
# ---------------------------------------------------------------------------------------------
_HYPERNYM_PATHS = ("longest", "first", "shortest")


def _wnid(synset) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def _database_hypernym_offsets(wn, synset) -> Optional[List[int]]:
    """Offsets of the synset's hypernym pointers (``@``, ``@i``) in the order of its line in
    the WordNet data file, or None if the line cannot be read."""
    try:  # nltk keeps pointers in a set (order varies per process), so read the line itself
        data = wn._data_file(synset.pos() if synset.pos() != "s" else "a")
        data.seek(synset.offset())
        line = data.readline()
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        tokens = line.split("|")[0].split()
        if int(tokens[0]) != synset.offset():
            return None
        position = 4 + 2 * int(tokens[3], 16)   # offset, lex file, ss_type, w_cnt, words
        offsets = []
        for _ in range(int(tokens[position])):
            symbol, offset = tokens[position + 1], tokens[position + 2]
            if symbol in ("@", "@i"):
                offsets.append(int(offset))
            position += 4
        return offsets
    except Exception:
        return None


def _wordnet_parents(wn, synsets: Iterable,
                     hypernym_path: str) -> Tuple[Dict[str, Optional[str]], Dict[str, str]]:
    """{wnid: parent wnid} over the synsets and their chosen ancestors, plus display names."""
    if hypernym_path not in _HYPERNYM_PATHS:
        raise ValueError(f"hypernym_path must be one of {_HYPERNYM_PATHS}, got {hypernym_path!r}")
    longest: Dict[Any, int] = {}
    shortest: Dict[Any, int] = {}
    ordered: Dict[Any, list] = {}

    def hypernyms(s):
        """Hypernyms and instance hypernyms in WordNet's database order (deterministic)."""
        if s not in ordered:
            ups = s.hypernyms() + s.instance_hypernyms()
            if len(ups) > 1:
                order = _database_hypernym_offsets(wn, s) or []
                rank = {offset: i for i, offset in enumerate(order)}
                ups.sort(key=lambda h: (rank.get(h.offset(), len(rank)), h.offset()))
            ordered[s] = ups
        return ordered[s]

    def depth_of(s, memo, pick):  # iterative, memoised longest / shortest path to the root
        stack = [s]
        while stack:
            top = stack[-1]
            if top in memo:
                stack.pop()
                continue
            pending = [h for h in hypernyms(top) if h not in memo]
            if pending:
                stack.extend(pending)
                continue
            ups = [memo[h] for h in hypernyms(top)]
            memo[top] = 0 if not ups else 1 + pick(ups)
            stack.pop()
        return memo[s]

    def choose(s):
        ups = hypernyms(s)
        if not ups:
            return None
        if hypernym_path == "first":
            return ups[0]
        if hypernym_path == "longest":
            scores = [depth_of(h, longest, max) for h in ups]
            return ups[int(np.argmax(scores))]  # argmax: first of the tied
        scores = [depth_of(h, shortest, min) for h in ups]
        return ups[int(np.argmin(scores))]

    parents: Dict[str, Optional[str]] = OrderedDict()
    names: Dict[str, str] = {}
    for synset in synsets:
        s = synset
        while True:
            key = _wnid(s)
            if key in parents:
                break
            names[key] = s.lemma_names()[0]
            up = choose(s)
            parents[key] = None if up is None else _wnid(up)
            if up is None:
                break
            s = up
    return parents, names


def _synset_for_wnid(wn, wnid: str, name: str):
    if not isinstance(wnid, str) or len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit():
        raise ValueError(f"{name} must hold WordNet noun ids like 'n01440764', got {wnid!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns, then returns None, for a missing offset
        try:
            synset = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
        except Exception:  # older nltk raises WordNetError / ValueError instead
            synset = None
    if synset is None:
        raise ValueError(f"{name}: {wnid!r} is not a WordNet 3.0 noun synset (no noun at offset {wnid[1:]})")
    return synset


def _read_imagenet_table() -> List[Tuple[str, str, str]]:
    text = resources.files("devinterp_losskernel").joinpath("data/imagenet_wnids.txt").read_text("utf-8")
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            wnid, short, full = line.split("\t")
            rows.append((wnid, short, full))
    return rows


def imagenet_wnids() -> List[str]:
    """The 1000 ImageNet-1k wnids in class-index order (class i ↔ ``imagenet_wnids()[i]``)."""
    return [row[0] for row in _read_imagenet_table()]


def imagenet_class_names(full: bool = False) -> List[str]:
    """The 1000 ImageNet-1k class names in class-index order: short names (``"tench"``), or
    with ``full=True`` the synset label (``"tench, Tinca tinca"``)."""
    return [row[2] if full else row[1] for row in _read_imagenet_table()]


def wordnet_imagenet(wnids: Optional[Sequence[str]] = None, *, hypernym_path: str = "longest",
                     data_dir: Union[str, Path, None] = None) -> Hierarchy:
    """The ImageNet–WordNet tree over ImageNet classes (paper, Section 4 and Appendix D.2).

    Nodes are wnids; each class hangs from ``entity`` (n00001740, depth 0) along one
    hypernym chain (``hypernym_path``, see the module docstring; default the longest).
    ``classes`` are the given wnids in order, so integer labels are class indices.

    Args:
        wnids: the classes' wnids (``"n01440764"``); default the 1000 ImageNet-1k classes
            in class-index order (shipped in ``data/imagenet_wnids.txt``).
        hypernym_path: ``"longest"`` (default), ``"first"`` or ``"shortest"``.
        data_dir: passed to :func:`ensure_wordnet`.

    Raises:
        WordNetNotFoundError: no WordNet on this machine (the message says how to install).
        ValueError: a wnid that is malformed or not a WordNet 3.0 noun.
    """
    wn = ensure_wordnet(data_dir)
    names: Dict[str, str] = {}
    if wnids is None:
        table = _read_imagenet_table()
        wnids = [row[0] for row in table]
        names.update({row[0]: row[1] for row in table})
    else:
        if isinstance(wnids, str):
            wnids = [wnids]
        wnids = list(wnids)
        if not wnids:
            raise ValueError("wnids must not be empty")
    synsets = [_synset_for_wnid(wn, w, "wnids") for w in wnids]
    # build in sorted wnid order so the children order (and leaf order) does not depend on
    # the order classes were listed in
    parents, node_names = _wordnet_parents(wn, sorted(synsets, key=_wnid), hypernym_path)
    node_names.update(names)
    return Hierarchy(parents, classes=wnids, names=node_names,
                     source=f"WordNet {wn.get_version()} ({hypernym_path} hypernym path)")


#: the ten Fashion-MNIST classes, in label order
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: Fashion-MNIST class → WordNet 3.0 noun (wnid, synset name)
FASHION_MNIST_WORDNET = {
    "T-shirt/top": ("n03595614", "jersey.n.03"),   # T-shirt, tee shirt, jersey
    "Trouser": ("n04489008", "trouser.n.01"),
    "Pullover": ("n04021028", "pullover.n.01"),
    "Dress": ("n03236735", "dress.n.01"),
    "Coat": ("n03057021", "coat.n.01"),
    "Sandal": ("n04133789", "sandal.n.01"),
    "Shirt": ("n04197391", "shirt.n.01"),
    "Sneaker": ("n03472535", "gym_shoe.n.01"),     # sneaker, tennis shoe
    "Bag": ("n02774152", "bag.n.04"),              # handbag, purse, pocketbook
    "Ankle boot": ("n02872752", "boot.n.01"),
}
# used where WordNet is missing: the same top-level split (clothing / footwear / bag)
_FASHION_FALLBACK = {
    "clothing": "item", "footwear": "item", "bag": "item",
    "tops": "clothing", "bottoms": "clothing", "one-piece": "clothing",
    "T-shirt/top": "tops", "Shirt": "tops", "Pullover": "tops", "Coat": "tops",
    "Trouser": "bottoms", "Dress": "one-piece",
    "Sandal": "footwear", "Sneaker": "footwear", "Ankle boot": "footwear",
    "Bag": "bag",
}


def fashion_mnist_hierarchy(*, use_wordnet: Optional[bool] = None, hypernym_path: str = "longest",
                            data_dir: Union[str, Path, None] = None) -> Hierarchy:
    """A tree over the ten Fashion-MNIST classes; integer labels 0–9 are class indices.

    With WordNet (the default when available) each class is its WordNet synset
    (:data:`FASHION_MNIST_WORDNET`) placed by the same rule as :func:`wordnet_imagenet`;
    class nodes are named by the class names ("Sandal"), the others by wnid with lemma
    display names. The tree then splits ``artifact`` into clothing (garment: shirt ⊃
    T-shirt, sweater ⊃ pullover, overgarment ⊃ coat, trouser; woman's clothing ⊃ dress),
    footwear (shoe ⊃ sandal, sneaker; boot) and container ⊃ bag. Note that WordNet puts
    T-shirt *under* shirt, so "Shirt" is an internal class node.

    Without WordNet a hand-written tree is used: item → clothing (tops: T-shirt/top, Shirt,
    Pullover, Coat; bottoms: Trouser; one-piece: Dress), footwear (Sandal, Sneaker, Ankle
    boot), bag (Bag). ``hierarchy.source`` says which was used.

    Args:
        use_wordnet: True: require WordNet (WordNetNotFoundError if missing); False: the
            hand-written tree; None (default): WordNet if available, else the hand-written
            tree with a warning.
    """
    if use_wordnet not in (None, True, False):
        raise ValueError(f"use_wordnet must be None, True or False, got {use_wordnet!r}")
    if use_wordnet is not False:
        try:
            wn = ensure_wordnet(data_dir)
        except WordNetNotFoundError:
            if use_wordnet:
                raise
            warnings.warn("WordNet not found: fashion_mnist_hierarchy() uses its hand-written "
                          "fallback tree (install wordnet-base for the WordNet one)", stacklevel=2)
        else:
            synsets = {cls: _synset_for_wnid(wn, FASHION_MNIST_WORDNET[cls][0], "FASHION_MNIST_WORDNET")
                       for cls in FASHION_MNIST_CLASSES}
            parents, names = _wordnet_parents(wn, synsets.values(), hypernym_path)
            rename = {_wnid(s): cls for cls, s in synsets.items()}
            parents = {rename.get(c, c): (None if p is None else rename.get(p, p)) for c, p in parents.items()}
            names = {rename.get(k, k): v for k, v in names.items() if k not in rename}
            return Hierarchy(parents, classes=list(FASHION_MNIST_CLASSES), names=names,
                             source=f"WordNet {wn.get_version()} ({hypernym_path} hypernym path)")
    hierarchy = Hierarchy(_FASHION_FALLBACK, classes=list(FASHION_MNIST_CLASSES),
                          source="hand-written fallback (no WordNet)")
    return hierarchy
