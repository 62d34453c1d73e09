"""The command line (issue 18): ``losskernel explore`` never destroys an input, names the flag
or file behind every refusal, and ``losskernel demo`` checks its output folder before training."""

from pathlib import Path

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel
from devinterp_losskernel.cli import main
from devinterp_losskernel.explore import read_explorer

N = 24


def small_kernel(n=N, seed=0):
    rng = np.random.default_rng(seed)
    losses = np.abs(rng.normal(size=(60, n)) + rng.normal(size=(60, 1)))
    cov = np.cov(losses, rowvar=False)
    return LossKernel(covariance=torch.tensor(cov), mean=torch.tensor(losses.mean(0)),
                      variance=torch.tensor(np.diag(cov).copy()), num_draws=60,
                      labels=torch.tensor(np.arange(n) % 3))


@pytest.fixture
def files(tmp_path):
    """A saved kernel, an embedding, texts, label names and a score, in tmp_path."""
    small_kernel().save(tmp_path / "kernel.pt")
    np.save(tmp_path / "emb.npy", np.random.default_rng(1).normal(size=(N, 2)))
    (tmp_path / "texts.txt").write_text("".join(f"sample {i}\n" for i in range(N)))
    (tmp_path / "names.txt").write_text("cat\ndog\ncar\n")
    np.save(tmp_path / "score.npy", np.arange(N, dtype=float))
    return tmp_path


def refused(capsys, *argv) -> str:
    """Run ``losskernel``; it must exit with status 2 (a usage error); returns its message."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def explore_args(files, *more):
    return ["explore", files / "kernel.pt", "--embedding", files / "emb.npy", *more]


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


@pytest.mark.parametrize("out, spelled", [
    ("kernel.pt", "kernel.pt"), ("emb.npy", "emb.npy"), ("texts.txt", "sub/../texts.txt"),
    ("names.txt", "./names.txt"), ("score.npy", "score.npy"),
])
def test_the_output_is_never_one_of_the_inputs(files, capsys, monkeypatch, out, spelled):
    (files / "sub").mkdir()
    monkeypatch.chdir(files)
    before = snapshot(files)
    message = refused(capsys, *explore_args(files, "--texts", files / "texts.txt", "--label-names",
                                            "names.txt", "--score", f"rank={files / 'score.npy'}", "-o", spelled))
    assert "--out must not be one of the inputs" in message and out in message
    assert snapshot(files) == before


def test_the_same_file_through_a_link_is_an_input(files, capsys):
    (files / "link.pt").symlink_to(files / "kernel.pt")
    before = (files / "kernel.pt").read_bytes()
    assert "one of the inputs" in refused(capsys, *explore_args(files, "-o", files / "link.pt"))
    assert (files / "kernel.pt").read_bytes() == before


def test_output_paths_say_what_they_expected(files, capsys):
    (files / "pages").mkdir()
    assert "--out must be a file path" in refused(capsys, *explore_args(files, "-o", files / "pages"))
    message = refused(capsys, *explore_args(files, "-o", files / "typo" / "k.html"))
    assert "--out must be inside an existing folder" in message and "does not exist" in message
    assert not (files / "typo").exists()
    message = refused(capsys, *explore_args(files, "-o", files / "names.txt" / "k.html"))
    assert "is a regular file" in message and "Errno" not in message


def test_an_existing_non_page_is_not_overwritten(files, capsys):
    np.save(files / "other.npy", np.zeros(3))
    before = (files / "other.npy").read_bytes()
    assert "not an HTML page" in refused(capsys, *explore_args(files, "-o", files / "other.npy"))
    assert (files / "other.npy").read_bytes() == before


def test_wrong_input_files_name_their_flag(files, capsys):
    np.save(files / "labels.npy", np.arange(N + 1) % 3)
    np.savez(files / "two.npz", a=np.zeros((N, 8, 8)), b=np.arange(N))
    (files / "binary.txt").write_bytes(bytes(range(256)))
    out = ["-o", files / "k.html"]
    cases = [
        (["--labels", files / "labels.npy"], "--labels: ", "one entry per probe sample (n=24)"),
        (["--images", files / "two.npz"], "--images: ", "holds 2 arrays"),
        (["--texts", files / "binary.txt"], "--texts: ", "UTF-8"),
        (["--texts", files / "names.txt"], "--texts: ", "one line per probe sample (n=24), got 3"),
        (["--images", files / "missing.npy"], "--images: ", "no such file"),
        (["--images", files], "--images: ", "which is a folder"),
        (["--images", files / "texts.txt"], "--images: ", ".npy, .npz or .pt"),
        (["--labels", files / "kernel.pt"], "--labels: ", "must hold one tensor"),
        (["--score", f"a={files / 'score.npy'}", "--score", f"a={files / 'emb.npy'}"], "--score: ", "given twice"),
        (["--score", "nofile"], "--score ", "NAME=FILE"),
        (["--image-layout", "NCHW"], "--image-layout ", "without --images"),
    ]
    for more, flag, what in cases:
        message = refused(capsys, *explore_args(files, *more, *out))
        assert flag in message and what in message, (more, message)
    (files / "fake.npy").write_text("<html>not numpy</html>")
    message = refused(capsys, *explore_args(files, "--labels", files / "fake.npy", *out))
    assert "--labels: cannot read" in message
    assert not (files / "k.html").exists()


def test_a_wrong_kernel_file_is_named(files, capsys):
    (files / "page.html").write_text("<!DOCTYPE html><html></html>")
    message = refused(capsys, "explore", files / "page.html", "-o", files / "k.html")
    assert message.startswith("losskernel explore: error: kernel: ") and "page.html" in message
    assert "kernel: no such file" in refused(capsys, "explore", files / "nope.pt", "-o", files / "k.html")
    assert "argument -k" in refused(capsys, *explore_args(files, "-k", "0", "-o", files / "k.html"))
    assert "argument --seed" in refused(capsys, *explore_args(files, "--seed", "-1", "-o", files / "k.html"))


def test_explore_with_stated_image_layout(files, capsys):
    images = np.zeros((N, 3, 4, 4), dtype=np.uint8)
    images[:, 1] = 255  # green, channels first
    np.save(files / "img.npy", images)
    message = refused(capsys, *explore_args(files, "--images", files / "img.npy", "-o", files / "k.html"))
    assert "ambiguous" in message and "NCHW" in message
    assert main([str(a) for a in explore_args(files, "--images", files / "img.npy", "--image-layout", "NCHW",
                                              "--label-names", files / "names.txt", "-o", files / "k.html")]) == 0
    data = read_explorer(files / "k.html")
    assert data["points"]["label_name"][:3] == ["cat", "dog", "car"]
    assert data["points"]["thumb"][0].startswith("data:image/webp")


def test_demo_checks_its_folder_before_training(tmp_path, capsys):
    (tmp_path / "out").write_text("a file, not a folder")
    message = refused(capsys, "demo", "--quick", "--out", tmp_path / "out")
    assert "--out must be a folder path" in message
    message = refused(capsys, "demo", "--quick", "--out", tmp_path / "out" / "sub")
    assert "is a regular file" in message
