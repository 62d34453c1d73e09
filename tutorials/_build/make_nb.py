"""Notebook builder: each tutorials/_build/NN_name.py writes tutorials/NN_name.ipynb (run it with python)."""
"""Build a notebook from a list of ("md"|"code", text) cells."""
import json, sys

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
