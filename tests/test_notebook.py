"""``notebooks/paper_figures.ipynb`` runs top to bottom (with tiny sizes) and draws both figures."""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "paper_figures.ipynb"
TINY = {"ls_steps": 40, "ps": [0.5, 0.1], "digits_steps": 30, "eval_every": 1}


def test_paper_figures_notebook_executes_and_draws_both_figures(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_NOTEBOOK_PARAMS", json.dumps({**TINY, "out_dir": str(tmp_path)}))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "ship it without outputs"
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "figure 1 (loss against p) and figure 2 (the three panels)"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for label in ("Sparse-ProxSkip", "server pruning", "proxskip p=0.2", "sparse_proxskip δ=0.3 p=0.2",
                  "server_pruning δ=0.3 p=0.2"):
        assert label in text
    assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["proxskip", "server_pruning",
                                                                          "sparse_proxskip"]
