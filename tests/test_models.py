"""The shipped reference checkpoints: real trained models that fold without changing a prediction."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

import bnfold
from bnfold.training.data import load_dataset

MODELS = Path(__file__).resolve().parents[1] / "models"
TABLE = (MODELS / "README.md").read_text()
ROWS = re.findall(r"\| (\S+\.pt) \| .* \| (\d) \| ([0-9.]+) \(([0-9.]+)\) \| ([0-9a-f]{64}) \|", TABLE)


def test_every_checkpoint_is_listed():
    assert sorted(r[0] for r in ROWS) == sorted(p.name for p in MODELS.glob("*.pt"))


@pytest.mark.parametrize("name,seed,accuracy,moving,sha", ROWS)
def test_checkpoint_folds_without_changing_predictions(name, seed, accuracy, moving, sha):
    path = MODELS / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert path.stat().st_size < 1_000_000
    payload = torch.load(path, weights_only=True)
    model = bnfold.load(path)
    data = load_dataset("digits", int(seed))
    x, y = data.tensors(tuple(payload["input_shape"]), "test")
    with torch.no_grad():
        before = model(x).argmax(1)
    assert float((before == y).float().mean()) == pytest.approx(float(accuracy), abs=1e-4)
    folded, report = bnfold.fold(model, x[:2])
    assert report.bn_kept == 0
    with torch.no_grad():
        assert torch.equal(folded(x).argmax(1), before)
    assert bnfold.verify(model, folded, x).passed
