"""Hierarchy trees: from_parents, WordNet (ImageNet, Fashion-MNIST), ensure_wordnet."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import hierarchy as hierarchy_module
from devinterp_losskernel.hierarchy import (
    FASHION_MNIST_CLASSES,
    LEXNAMES,
    Hierarchy,
    WordNetNotFoundError,
    ensure_wordnet,
    fashion_mnist_hierarchy,
    imagenet_class_names,
    imagenet_wnids,
    wordnet_imagenet,
)

from _wordnet import wordnet  # noqa: F401  (session fixture)

TENCH, FISH, ANIMAL, ENTITY = "n01440764", "n02512053", "n00015388", "n00001740"
DOG, CHIHUAHUA, DOMESTIC_ANIMAL = "n02084071", "n02085620", "n01317541"


@pytest.fixture
def tree():
    #            root
    #         /        \
    #        A          B
    #      /   \        |  \
    #     a1    a2      b1  b2
    #    / \    |
    #   x   y   z
    return Hierarchy.from_parents({
        "A": "root", "B": "root", "a1": "A", "a2": "A", "b1": "B", "b2": "B",
        "x": "a1", "y": "a1", "z": "a2",
    })


def random_tree(rng, size):
    parents = {}
    for i in range(1, size):
        parents[i] = int(rng.integers(0, i))
    return Hierarchy.from_parents(parents)


# ---------------------------------------------------------------------------------------------
# from_parents
# ---------------------------------------------------------------------------------------------
def test_depths_ancestors_lca(tree):
    assert tree.root == "root"
    assert tree.depth("root") == 0
    assert [tree.depth(v) for v in ("A", "a1", "x")] == [1, 2, 3]
    assert tree.ancestors("x") == ["a1", "A", "root"]
    assert tree.ancestors("root") == []
    assert tree.path("x") == ["root", "A", "a1", "x"]
    assert tree.ancestor_at_depth("x", 1) == "A"
    assert tree.ancestor_at_depth("A", 3) == "A"
    assert tree.lowest_common_ancestor("x", "y") == "a1"
    assert tree.lowest_common_ancestor("x", "z") == "A"
    assert tree.lowest_common_ancestor("x", "b2") == "root"
    assert tree.lowest_common_ancestor("x", "a1") == "a1"
    assert tree.lowest_common_ancestor("b1", "b1") == "b1"
    assert tree.distance("x", "y") == 2 and tree.distance("x", "b1") == 5 and tree.distance("x", "x") == 0
    assert tree.parent("root") is None and tree.children("A") == ["a1", "a2"]
    assert tree.max_depth == 3 and len(tree) == 10 and "z" in tree and "nope" not in tree


def test_root_may_map_to_none_and_round_trip(tree):
    again = Hierarchy.from_parents({"root": None, **tree.to_parents()})
    assert again.root == "root"
    assert again.to_parents() == tree.to_parents()
    assert again.leaf_order() == tree.leaf_order()


def test_leaf_order_is_depth_first_in_mapping_order(tree):
    assert tree.leaf_order() == ["x", "y", "z", "b1", "b2"]
    assert tree.leaves() == ["x", "y", "z", "b1", "b2"]
    labels = np.array(["b2", "x", "z", "y", "b1", "x"])
    order = tree.sample_order(labels)
    assert labels[order].tolist() == ["x", "x", "y", "z", "b1", "b2"]
    positions = tree.positions(["x", "b2"])
    np.testing.assert_allclose(positions, [0.0, 4 / 5])


def test_distance_matrix_matches_pairwise_distance():
    rng = np.random.default_rng(1)
    h = random_tree(rng, 40)
    nodes = list(range(40))
    labels = rng.integers(0, 40, size=60)
    D = h.distance_matrix(labels)
    assert D.shape == (60, 60) and D.dtype == np.int32
    expected = np.array([[h.distance(int(a), int(b)) for b in labels] for a in labels])
    np.testing.assert_array_equal(D, expected)
    lca = h.lca_depth_matrix(nodes)
    for a, b in itertools.combinations(nodes, 2):
        assert lca[a, b] == h.depth(h.lowest_common_ancestor(a, b))
    np.testing.assert_array_equal(D, D.T)
    assert np.all(np.diag(D) == 0)


def test_labels_as_class_indices_torch_and_numpy():
    h = Hierarchy.from_parents({"cat": "animal", "dog": "animal", "animal": "thing", "car": "thing"},
                               classes=["cat", "dog", "car"])
    assert h.node_of(1) == "dog" and h.node_of(np.int64(2)) == "car" and h.node_of("cat") == "cat"
    assert h.depth(0) == 2 and h.name(2) == "car" and h.lowest_common_ancestor(0, 1) == "animal"
    np.testing.assert_array_equal(h.distance_matrix(torch.tensor([0, 1, 2])),
                                  [[0, 2, 3], [2, 0, 3], [3, 3, 0]])
    np.testing.assert_array_equal(h.depths(np.array([0, 2])), [2, 1])
    assert h.leaf_order() == ["cat", "dog", "car"]
    groups = h.ancestors_at_depth([0, 1, 2], 1)
    assert groups.tolist() == ["animal", "animal", "car"]


def test_position_colors_follow_leaf_order(tree):
    colours = tree.position_colors(["x", "y", "b2", "x"])
    assert colours.shape == (4, 4)
    np.testing.assert_array_equal(colours[0], colours[3])
    # neighbouring leaves get closer hues than distant ones
    assert np.abs(colours[0] - colours[1]).sum() < np.abs(colours[0] - colours[2]).sum()
    with pytest.raises(ValueError, match="cmap"):
        tree.position_colors(["x"], cmap="no-such-map")


@pytest.mark.parametrize("mapping, message", [
    ({"a": "r", "b": "s"}, "single root"),
    ({"a": "b", "b": "a"}, "cycle"),
    ({"a": "r", "b": "c", "c": "d", "d": "b"}, "cycle"),
    ({"a": "a"}, "cycle"),
    ({}, "empty"),
])
def test_bad_trees_raise(mapping, message):
    with pytest.raises(ValueError, match=message):
        Hierarchy.from_parents(mapping)


def test_bad_inputs_name_the_argument(tree):
    with pytest.raises(ValueError, match="mapping"):
        Hierarchy.from_parents([("a", "b")])
    with pytest.raises(ValueError, match="classes"):
        Hierarchy.from_parents({"a": "r"}, classes=["a", "zz"])
    with pytest.raises(ValueError, match=r"labels.*'nope'"):
        tree.distance_matrix(["x", "nope"])
    with pytest.raises(ValueError, match="labels"):
        tree.distance_matrix(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="node"):
        tree.depth("nope")
    with pytest.raises(ValueError, match="depth"):
        tree.ancestors_at_depth(["x"], -1)


def test_fashion_fallback_tree():
    h = fashion_mnist_hierarchy(use_wordnet=False)
    assert "hand-written" in h.source
    assert h.classes == list(FASHION_MNIST_CLASSES)
    assert h.lowest_common_ancestor(5, 7) == "footwear"          # Sandal, Sneaker
    assert h.lowest_common_ancestor(0, 6) == "tops"              # T-shirt/top, Shirt
    assert h.lowest_common_ancestor(1, 8) == h.root              # Trouser, Bag


# ---------------------------------------------------------------------------------------------
# WordNet data
# ---------------------------------------------------------------------------------------------
def test_lexnames_file_format():
    lines = hierarchy_module._lexnames_text().splitlines()
    assert len(lines) == len(LEXNAMES) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[44] == "44\tadj.ppl\t3"


def test_missing_wordnet_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(hierarchy_module, "_loaded_nltk_wordnet", lambda: None)
    with pytest.raises(WordNetNotFoundError) as info:
        ensure_wordnet(tmp_path / "nltk", source_dir=tmp_path / "no-wordnet-here")
    message = str(info.value)
    assert "apt-get install wordnet-base" in message
    assert "nltk.download('wordnet')" in message
    assert "source_dir" in message
    assert isinstance(info.value, LookupError)


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSKERNEL_NLTK_DATA", str(tmp_path / "here"))
    assert hierarchy_module._default_data_dir() == tmp_path / "here"
    monkeypatch.delenv("LOSSKERNEL_NLTK_DATA")
    assert hierarchy_module._default_data_dir().parts[-2:] == ("devinterp_losskernel", "nltk_data")


def test_debian_copy_layout(tmp_path, monkeypatch):
    """The Debian files become an nltk-data folder with lexnames (run where they exist)."""
    source = hierarchy_module.DEBIAN_WORDNET_DIR
    if not (source / "data.noun").is_file():
        if hierarchy_module.os.environ.get("LOSSKERNEL_REQUIRE_WORDNET") == "1":
            pytest.fail(f"LOSSKERNEL_REQUIRE_WORDNET=1 but {source} has no data.noun")
        pytest.skip(f"{source} not installed (apt-get install wordnet-base)")
    target = tmp_path / "corpora" / "wordnet"
    hierarchy_module._build_nltk_layout(source, target)
    assert (target / "lexnames").read_text().startswith("00\tadj.all\t3\n")
    assert (target / "index.sense").is_file() and (target / ".devinterp_losskernel").is_file()
    assert hierarchy_module._is_complete(target)
    # the copy is then readable by nltk (a fresh reader: the global one may already be loaded)
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)] + list(nltk.data.path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        reader = WordNetCorpusReader(str(target), None)
    synset = reader.synset_from_pos_and_offset("n", int(TENCH[1:]))
    assert synset.name() == "tench.n.01" and synset.lexname() == "noun.animal"


# ---------------------------------------------------------------------------------------------
# WordNet trees
# ---------------------------------------------------------------------------------------------
def test_imagenet_class_list():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(set(wnids)) == 1000 == len(names)
    assert wnids[0] == TENCH and names[0] == "tench"
    assert imagenet_class_names(full=True)[1] == "goldfish, Carassius auratus"
    assert all(w[0] == "n" and len(w) == 9 for w in wnids)


@pytest.fixture(scope="module")
def imagenet(wordnet):  # noqa: F811
    return wordnet_imagenet()


def test_imagenet_tree_known_ancestry(imagenet):
    h = imagenet
    assert h.root == ENTITY and h.depth(ENTITY) == 0
    assert len(h.classes) == 1000 and h.classes[0] == TENCH
    ancestors = h.ancestors(TENCH)
    assert FISH in ancestors and ANIMAL in ancestors and ancestors[-1] == ENTITY
    assert h.name(TENCH) == "tench" and h.name(FISH) == "fish"
    # the longest hypernym path puts dogs under canine/carnivore, not domestic_animal
    assert DOG in h.ancestors(CHIHUAHUA) and DOMESTIC_ANIMAL not in h.ancestors(DOG)
    assert h.depth(DOG) == 13
    assert "WordNet 3.0" in h.source and "longest" in h.source
    # integer labels are class indices
    assert h.node_of(0) == TENCH
    D = h.distance_matrix([0, 1, 0])
    assert D[0, 2] == 0 and D[0, 1] == h.distance(TENCH, "n01443537")
    # every ImageNet-1k class is a leaf; the leaf order holds each class once
    order = h.leaf_order()
    assert sorted(order) == sorted(h.classes) and all(h.is_leaf(c) for c in h.classes)


def test_wordnet_depth_matches_nltk_max_depth(imagenet, wordnet):  # noqa: F811
    for wnid in (TENCH, CHIHUAHUA, "n04592741"):  # tench, Chihuahua, wing
        synset = wordnet.synset_from_pos_and_offset("n", int(wnid[1:]))
        assert imagenet.depth(wnid) == synset.max_depth()


def test_other_hypernym_paths(wordnet, imagenet):  # noqa: F811
    h = wordnet_imagenet([CHIHUAHUA, TENCH], hypernym_path="shortest")
    assert DOMESTIC_ANIMAL in h.ancestors(DOG) and h.depth(DOG) == 8
    assert h.classes == [CHIHUAHUA, TENCH] and h.node_of(1) == TENCH
    # "first" follows the data file's order (dog.n.01 lists canine.n.02 first), not nltk's
    # set order, so it is the same in every process
    first = wordnet_imagenet([CHIHUAHUA], hypernym_path="first")
    assert first.path(DOG) == imagenet.path(DOG)
    abaya = "n02667093"  # clothing: listed first under covering, longest via commodity
    first = wordnet_imagenet([abaya], hypernym_path="first")
    assert [first.name(v) for v in first.path(abaya)][4:7] == ["artifact", "covering", "clothing"]
    assert [imagenet.name(v) for v in imagenet.path(abaya)][4:8] == [
        "artifact", "commodity", "consumer_goods", "clothing"]
    with pytest.raises(ValueError, match="hypernym_path"):
        wordnet_imagenet([TENCH], hypernym_path="widest")


def test_bad_wnids_raise(wordnet):  # noqa: F811
    with pytest.raises(ValueError, match="wnids"):
        wordnet_imagenet(["x01440764"])
    with pytest.raises(ValueError, match="wnids"):
        wordnet_imagenet(["n99999999"])


def test_fashion_mnist_wordnet_tree(wordnet):  # noqa: F811
    h = fashion_mnist_hierarchy(use_wordnet=True)
    assert "WordNet" in h.source
    assert h.classes == list(FASHION_MNIST_CLASSES) and h.root == ENTITY
    name = lambda node: h.name(node)  # noqa: E731
    assert name(h.lowest_common_ancestor("Sandal", "Sneaker")) == "shoe"
    assert name(h.lowest_common_ancestor("Sandal", "Ankle boot")) == "footwear"
    assert name(h.lowest_common_ancestor("Coat", "Trouser")) == "garment"
    assert name(h.lowest_common_ancestor("Dress", "Pullover")) == "clothing"
    assert name(h.lowest_common_ancestor("Bag", "Coat")) == "artifact"
    assert h.parent("T-shirt/top") == "Shirt"
    # default (None) picks WordNet when available
    assert "WordNet" in fashion_mnist_hierarchy().source
