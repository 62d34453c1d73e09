"""Every tutorial notebook runs top to bottom at CI scale (LOSSKERNEL_TUTORIAL_SCALE=ci).

Code cells are executed in order in one fresh namespace, as a kernel would; IPython magics
and shell escapes are not allowed in tutorials, so that this stays possible without Jupyter.
The notebooks assert their own key numbers with bounds a broken pipeline would fail.
"""

import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


def code_of(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/ must hold at least one notebook"


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs(notebook, tmp_path, monkeypatch):
    from conftest import devinterp_major

    meta = json.loads(notebook.read_text()).get("metadata", {}).get("losskernel", {})
    if meta.get("devinterp_major") not in (None, devinterp_major()):
        pytest.skip(f"{notebook.name} is written for devinterp {meta['devinterp_major']}.x")
    monkeypatch.setenv("LOSSKERNEL_TUTORIAL_SCALE", "ci")
    monkeypatch.chdir(tmp_path)
    source = code_of(notebook)
    for line in source.splitlines():
        assert not line.lstrip().startswith(("%", "!")), f"{notebook.name}: no magics ({line!r})"
    import torch

    threads = torch.get_num_threads()  # a notebook may pin torch to one thread on a CPU
    try:
        exec(compile(source, str(notebook), "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
