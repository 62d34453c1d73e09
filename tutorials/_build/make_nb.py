"""Notebook builder: each tutorials/_build/NN_name.py writes tutorials/NN_name.ipynb (run it with python)."""
"""Build a notebook from a list of ("md"|"code", text) cells."""
import json, sys

# The first code cell of every notebook: install this package in Colab or on a fresh machine,
# and the tutorials' pipelines beside it (losskernel_examples, the package in examples/: not part
# of the library's wheel). Locally and in CI both are installed editable (.ci/run), so it does nothing.
INSTALL_PACKAGE = '''
# Colab / fresh machine: install this package (and devinterp 1.3) from the repository, and the
# tutorials' models, data and training loops (the package losskernel_examples in its examples/).
# Set REPO to where this repository lives if you use a fork.
import importlib.util, os, subprocess, sys

REPO = "https://github.com/timaeus-research/devinterp-losskernel"
to_install = []
if importlib.util.find_spec("devinterp_losskernel") is None:
    to_install += [f"devinterp-losskernel[all] @ git+{REPO}", "devinterp>=1.3,<2"]
if importlib.util.find_spec("losskernel_examples") is None:
    to_install += [f"losskernel-examples @ git+{REPO}#subdirectory=examples"]
if to_install:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *to_install])
'''

# For the notebooks on Fashion-MNIST and its WordNet tree.
FASHION_MNIST_COLAB = '''
# Fashion-MNIST is read from local IDX files (Debian: apt-get install dataset-fashion-mnist).
# On Colab, where that package is missing, fetch the same files once with torchvision and
# point the reader at them; WordNet comes from nltk's downloader there.
if "google.colab" in sys.modules and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    import nltk, torchvision
    torchvision.datasets.FashionMNIST("/content/data", train=True, download=True)
    torchvision.datasets.FashionMNIST("/content/data", train=False, download=True)
    os.environ["LOSSKERNEL_FASHION_MNIST_DIR"] = "/content/data/FashionMNIST/raw"
    nltk.download("wordnet", quiet=True)
'''


def install_cell(*extras: str) -> str:
    """The install cell's code: INSTALL_PACKAGE followed by a notebook's own extra steps."""
    return "\n".join(part.strip("\n") for part in (INSTALL_PACKAGE, *extras)) + "\n"


def notebook(cells, path, devinterp_major=None):
    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n").splitlines(True)}
            if kind == "md" else
            {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
             "source": text.strip("\n").splitlines(True)}
            for kind, text in cells
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "accelerator": "GPU",
            "colab": {"provenance": []},
            "losskernel": {"devinterp_major": devinterp_major} if devinterp_major else {},
        },
        "nbformat": 4, "nbformat_minor": 5,
    }
    with open(path, "w") as fh:
        json.dump(nb, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
