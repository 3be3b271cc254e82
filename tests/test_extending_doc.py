"""docs/extending.md's walkthrough works as written: its ProximalTerm and its preset, run in a fresh interpreter (the
preset registers a name), train exactly as the shipped FedProx does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = '''
import torch
from torch import nn
from fl_lightning import FederatedDataModule, FederatedLightningModule
from fl_lightning.algorithms import FedProx, get_algorithm
from tests.conftest import least_squares, make_trainer

problem = least_squares(n=4, d=6, m=12)

def fit(algorithm):
    model = nn.Linear(6, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    dm = FederatedDataModule.from_client_tensors(problem.clients, batch_size=4, seed=0)
    module = FederatedLightningModule(model, lr=0.1, loss="mse", algorithm=algorithm)
    make_trainer(12, []).fit(module, datamodule=dm)
    return module.global_model.weight

ours = fit(get_algorithm("my_fedprox", local_steps=3, mu=0.5, cohort_size=2, seed=1))
shipped = fit(FedProx(local_steps=3, mu=0.5, cohort_size=2, seed=1))
plain = fit(FedProx(local_steps=3, mu=0.0, cohort_size=2, seed=1))
assert torch.equal(ours, shipped), (ours, shipped)
assert not torch.equal(ours, plain)  # mu acts
print("walkthrough ok")
'''


def test_the_fedprox_walkthrough_runs_and_equals_the_shipped_preset() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(), flags=re.S)
    definitions = [b for b in blocks if "class " in b]  # the callback and the preset; the other block is usage
    assert len(definitions) == 2
    assert sum(d.count("\n") for d in definitions) < 50  # the README: "FedProx in under 50 lines"
    source = "\n".join(definitions) + CHECK
    done = subprocess.run([sys.executable, "-c", source], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "walkthrough ok" in done.stdout
