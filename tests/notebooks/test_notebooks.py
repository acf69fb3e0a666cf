"""Every notebook runs top to bottom (with Kestrel installed, the install cell is a no-op)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_quickstart.ipynb", "02_partition_planner.ipynb"]


def _execute(path, workdir, attempts: int = 3):
    """Run the notebook; retry a kernel that died while starting (its ports, chosen free by
    jupyter_client, can be taken by another process before it binds them)."""
    for attempt in range(attempts):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}}
        )
        try:
            client.execute()
            return nb
        except RuntimeError as e:
            if "Kernel died before replying" not in str(e) or attempt == attempts - 1:
                raise


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")  # one kernel at a time (make test: --dist loadgroup)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    stored = nbformat.read(path, as_version=4)
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: outputs must be stripped"
    nb = _execute(path, str(tmp_path))
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors
