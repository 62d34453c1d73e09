"""The ImageNet task module: generated folder, loader, GoogLeNet weights, scales, errors."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from devinterp_losskernel.hierarchy import imagenet_wnids  # noqa: E402
from losskernel_examples import imagenet as task  # noqa: E402
from losskernel_examples.imagenet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCALES,
    TINY_CLASSES,
    ImageNetFolder,
    calibrate_batchnorm,
    for_untrained,
    imagenet_evaluate,
    imagenet_loss_fn,
    load_googlenet,
    load_probe,
    make_tiny_imagenet,
    normalize_images,
    probe_indices,
    resolve_imagenet_dirs,
    training_loader,
)

WNIDS = sorted(w for w, _ in TINY_CLASSES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_imagenet(tmp_path_factory.mktemp("imagenet") / "tiny", train_per_class=3,
                              val_per_class=2, image_size=40)


# --------------------------------------------------------------------------------------------
# The generated folder
# --------------------------------------------------------------------------------------------
def test_tiny_folder_layout(tiny):
    for split, count in (("train", 3), ("val", 2)):
        folders = sorted(p.name for p in (tiny / split).iterdir())
        assert folders == WNIDS
        for wnid in folders:
            assert len(list((tiny / split / wnid).glob("*.JPEG"))) == count
    assert all(w in imagenet_wnids() for w in WNIDS)


def test_tiny_classes_span_the_tree():
    names = dict(TINY_CLASSES)
    assert len(TINY_CLASSES) == 6 and len(set(names)) == 6
    index = {w: imagenet_wnids().index(w) for w in names}
    dogs = [w for w, i in index.items() if 151 <= i <= 268]   # ImageNet's dog classes
    cats = [w for w, i in index.items() if 281 <= i <= 285]   # domestic cats
    assert len(dogs) == 2 and len(cats) == 1


def test_tiny_folder_is_deterministic_and_class_dependent(tmp_path):
    a = make_tiny_imagenet(tmp_path / "a", train_per_class=1, val_per_class=6, image_size=48, seed=3)
    b = make_tiny_imagenet(tmp_path / "b", train_per_class=1, val_per_class=6, image_size=48, seed=3)
    fa, fb = ImageNetFolder(a / "val", 32, normalize=False), ImageNetFolder(b / "val", 32, normalize=False)
    xa, ya = load_probe(fa, range(len(fa)))
    xb, _ = load_probe(fb, range(len(fb)))
    assert torch.equal(xa, xb)
    c = make_tiny_imagenet(tmp_path / "c", train_per_class=1, val_per_class=6, image_size=48, seed=4)
    assert not torch.equal(xa, load_probe(ImageNetFolder(c / "val", 32, normalize=False), range(36))[0])
    # no two images alike
    flat = xa.reshape(len(xa), -1).float()
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 0
    # the object's colour is the class's: each image's mean deviation from its background
    # (the median colour) is nearest its own class's average for most images (the two dogs,
    # tan and golden, may be confused)
    pixels = xa.float().flatten(2)
    feature = (pixels - pixels.median(dim=2, keepdim=True).values).mean(dim=2)
    classes = ya.unique()
    means = torch.stack([feature[ya == c].mean(0) for c in classes])
    nearest = classes[torch.cdist(feature, means).argmin(1)]
    assert (nearest == ya).float().mean() >= 0.7


def test_tiny_folder_rejects_unknown_classes(tmp_path):
    with pytest.raises(ValueError, match="classes must be among"):
        make_tiny_imagenet(tmp_path, classes=("n01440764",))
    with pytest.raises(ValueError, match="train_per_class"):
        make_tiny_imagenet(tmp_path, train_per_class=0)


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------
def test_resolve_dirs(tiny, tmp_path):
    assert resolve_imagenet_dirs(tiny) == (tiny / "train", tiny / "val")
    assert resolve_imagenet_dirs(tiny / "val") == (tiny / "val", tiny / "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_imagenet_dirs(tmp_path / "missing")


def test_folder_labels_are_imagenet_indices(tiny):
    folder = ImageNetFolder(tiny / "val", 48)
    assert len(folder) == 12 and folder.classes == WNIDS
    all_wnids = imagenet_wnids()
    for (path, target), wnid in zip(folder.samples, folder.wnids):
        assert all_wnids[target] == wnid and f"/{wnid}/" in path
    image, target = folder[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert target == all_wnids.index(WNIDS[0])


def test_normalisation_and_crop(tiny):
    raw = ImageNetFolder(tiny / "val", 32, normalize=False)
    normed = ImageNetFolder(tiny / "val", 32)
    x8, _ = raw[3]
    xf, _ = normed[3]
    assert x8.dtype == torch.uint8 and x8.shape == (3, 32, 32)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(xf, (x8.float() / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(normalize_images(x8[None])[0], xf, atol=1e-5)
    # non-square input: resized by the shorter side, then centre-cropped to a square
    from PIL import Image

    wide = tiny.parent / "wide" / WNIDS[0]
    wide.mkdir(parents=True)
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, 20:40] = 255                                      # a white centre third
    Image.fromarray(pixels).save(wide / "a.png")
    x, _ = ImageNetFolder(wide.parent, 20, normalize=False)[0]
    assert x.shape == (3, 20, 20) and x.float().mean() > 250     # only the centre is kept


def test_probe_and_training_loader(tiny):
    folder = ImageNetFolder(tiny / "train", 32, normalize=False)
    index = probe_indices(len(folder), 10, seed=1)
    assert len(index) == 10 and (np.diff(index) > 0).all()
    assert np.array_equal(probe_indices(len(folder), None), np.arange(len(folder)))
    images, targets = load_probe(folder, index)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.tolist() == folder.targets[index].tolist()
    for in_memory in (True, False):
        loader = training_loader(folder, 4, in_memory=in_memory)
        batches = list(loader)
        assert len(batches) == len(folder) // 4                  # full batches only
        x, y = batches[0]
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
        assert set(y.tolist()) <= set(folder.targets.tolist())
    with pytest.raises(ValueError, match="exceeds"):
        training_loader(folder, 1000)


def test_folder_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageNetFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class folders named by WordNet id.*train/ and val/"):
        ImageNetFolder(tiny)
    (tmp_path / "n99999999").mkdir()
    with pytest.raises(ValueError, match="not ImageNet-1k classes"):
        ImageNetFolder(tmp_path)
    empty = tmp_path / "empty" / "n01440764"
    empty.mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        ImageNetFolder(empty.parent)
    with pytest.raises(ValueError, match="image_size"):
        ImageNetFolder(tiny / "val", 8)
    broken = tmp_path / "broken" / "n01440764"
    broken.mkdir(parents=True)
    (broken / "x.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot read image"):
        ImageNetFolder(broken.parent)[0]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained():
    return load_googlenet(None, seed=0)


def test_untrained_googlenet(untrained):
    assert not untrained.training and untrained.aux_logits is False
    assert untrained.aux1 is None and untrained.transform_input is False
    again = load_googlenet(None, seed=0)
    for a, b in zip(untrained.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        logits = untrained(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1000)


def test_weights_from_a_state_dict_file(untrained, tmp_path):
    import torchvision

    # torchvision's own files carry the auxiliary classifiers; DDP adds "module."
    donor = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    state = {f"module.{k}": v for k, v in donor.state_dict().items()}
    assert any(k.startswith("module.aux1.") for k in state)
    path = tmp_path / "googlenet.pth"
    torch.save({"state_dict": state}, path)
    model = load_googlenet(path)
    assert model.transform_input is True                        # torchvision's pretrained convention
    assert torch.equal(model.fc.weight, donor.fc.weight)
    assert torch.equal(model.inception5b.branch1.conv.weight, donor.inception5b.branch1.conv.weight)
    assert not torch.equal(model.fc.weight, untrained.fc.weight)
    assert load_googlenet(str(path), transform_input=False).transform_input is False
    plain = tmp_path / "plain.pth"
    torch.save(untrained.state_dict(), plain)
    reloaded = load_googlenet(plain, transform_input=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), untrained(x))


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        load_googlenet(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_googlenet(bad)
    other = tmp_path / "resnet.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ValueError, match="not a torchvision GoogLeNet state_dict"):
        load_googlenet(other)
    with pytest.raises(ValueError, match="weights must be"):
        load_googlenet(42)


def test_losses_and_batchnorm_calibration(tiny):
    folder = ImageNetFolder(tiny / "train", 32, normalize=False)
    torch.manual_seed(0)                                          # the loader's shuffling
    loader = training_loader(folder, 6)
    model = load_googlenet(None, seed=0)
    x, y = next(iter(loader))
    before = imagenet_loss_fn(model, (x, y))
    assert before.shape == (6,) and torch.isfinite(before).all()
    # uint8 batches are normalised inside; float batches are taken as normalised
    assert torch.allclose(before, imagenet_loss_fn(model, (normalize_images(x), y)), atol=1e-5)
    calibrate_batchnorm(model, loader, num_batches=2)
    assert not model.training
    after = imagenet_loss_fn(model, (x, y)).detach()
    # untrained: near log(1000); with the default statistics (0, 1) the signal dies out and
    # the images' losses hardly differ, with calibrated ones they do
    assert abs(after.mean().item() - math.log(1000)) < 1.5
    assert after.std() > 4 * before.detach().std()
    last = model.inception5b.branch1.bn
    assert not torch.allclose(last.running_var, torch.ones_like(last.running_var))
    model.train()
    loss = imagenet_evaluate(model, (x, y))
    assert not model.training and loss.ndim == 0 and loss.requires_grad
    assert torch.allclose(loss.detach(), after.mean(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------------
def test_paper_scale_is_table_1():
    from devinterp_losskernel import preset

    paper, table = SCALES["paper"], preset("inception_imagenet")
    assert paper.image_size == 256 and paper.num_probe == 10_000 and paper.batch_size == table.batch_size
    assert paper.sampler_kwargs() == {**table.sampler_kwargs(), "num_steps_bw_draws": 1}
    sweep = preset("inception_gamma_sweep")
    kwargs = paper.sweep_kwargs(1300.0)
    assert (kwargs["num_chains"], kwargs["num_draws"], kwargs["num_burnin_steps"], kwargs["lr"]) == \
        (sweep.num_chains, sweep.num_draws, sweep.num_burnin_steps, sweep.lr)


def test_for_untrained_keeps_eps_gamma():
    cfg = SCALES["ci"]
    scaled = for_untrained(cfg)
    assert math.isclose(scaled.lr * scaled.localization, cfg.lr * cfg.localization)
    assert scaled.localization == 250 * cfg.localization
    assert scaled.gamma_sweep == tuple(250 * g for g in cfg.gamma_sweep)
    with pytest.raises(ValueError, match="scale must be one of"):
        task.get_scale("huge")


def test_snapshot_schedule_ends_at_total():
    for total, snaps in ((60, 6), (7500, 15), (5, 10)):
        counts = task._snapshot_every(total, snaps)
        assert counts[-1] == total and counts == sorted(set(counts)) and counts[0] >= 2


def test_torchvision_weights_enum_and_name(monkeypatch):
    """torchvision's enum (or its name) goes to torchvision, which would download it: faked."""
    import torchvision

    calls = []
    real = torchvision.models.googlenet

    def fake(weights=None, **kwargs):
        calls.append((weights, kwargs))
        return real(weights=None, aux_logits=False, init_weights=True, transform_input=True)

    monkeypatch.setattr(torchvision.models, "googlenet", fake)
    enum = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    load_googlenet(enum)
    load_googlenet("IMAGENET1K_V1")
    assert [c[0] for c in calls] == [enum, enum]
    assert all(c[1].get("aux_logits") is False for c in calls)
