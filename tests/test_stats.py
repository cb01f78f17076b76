"""`bnfold stats`: population statistics over a user's data, exact against float64, from every source kind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.training.sources import open_source
from bnfold.training.stats import recompute_statistics


class BNAct(nn.BatchNorm2d):
    """A norm-act module: BN then ReLU in one forward (timm style)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _models():
    torch.manual_seed(0)
    return {
        "bn1d-2d": (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), (6,)),
        "bn1d-3d": (nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), (2, 9)),
        "bn2d": (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
            (3, 6, 6),
        ),
        "bn3d": (nn.Sequential(nn.Conv3d(1, 3, 2), nn.BatchNorm3d(3)), (1, 4, 4, 4)),
        "norm-act": (nn.Sequential(nn.Conv2d(1, 4, 3), BNAct(4), nn.Conv2d(4, 2, 1), BNAct(2)), (1, 5, 5)),
    }


def _direct(model: nn.Module, x: np.ndarray, batch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Algorithm 2 computed directly in float64: batch statistics in train mode, pooled over the batches."""
    model = model.double().train()
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().numpy())
                )
            )
    with torch.no_grad():
        for start in range(0, len(x), batch):
            model(torch.from_numpy(x[start : start + batch]).double())
    for h in handles:
        h.remove()
    out = {}
    for name, inputs in seen.items():
        per_batch = [np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in inputs]
        values = sum(b.shape[1] for b in per_batch)
        mean = sum(b.sum(axis=1) for b in per_batch) / values
        within = sum(((b - b.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) for b in per_batch)
        out[name] = (mean, within / (values - len(per_batch)))
    return out


@pytest.mark.parametrize("kind", list(_models()))
@pytest.mark.parametrize("samples", [40, 37], ids=["equal-batches", "short-last-batch"])
def test_statistics_equal_direct_float64(tmp_path, kind, samples):
    model, shape = _models()[kind]
    x = np.random.default_rng(1).standard_normal((samples, *shape)).astype(np.float32) * 2 + 0.5
    np.save(tmp_path / "x.npy", x)
    expected = _direct(_models()[kind][0], x, 8)
    result = recompute_statistics(model, str(tmp_path / "x.npy"), batch_size=8, input_shape=shape, progress=False)
    assert result.statistics.batches == -(-samples // 8)
    modules = dict(model.named_modules())
    for name, (mean, var) in expected.items():
        np.testing.assert_allclose(modules[name].running_mean.double().numpy(), mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(modules[name].running_var.double().numpy(), var, rtol=1e-6, atol=1e-7)
    if samples == 40:  # equal batches: exactly the paper's E_B[mu_B] and m/(m-1) E_B[sigma_B^2]
        first = next(iter(expected))
        values = _direct(_models()[kind][0], x[:8], 8)[first][1]  # one batch: its unbiased variance
        assert np.all(values > 0)


def _stale(tmp_path):
    """A trained cnn-bn whose BN statistics were lost (reset to 0 / 1, as after pruning): its accuracy drops."""
    ckpt = torch.load("models/cnn-bn.pt", weights_only=True)
    state = dict(ckpt["state_dict"])
    for key in state:
        if key.endswith("running_mean"):
            state[key] = torch.zeros_like(state[key])
        if key.endswith("running_var"):
            state[key] = torch.ones_like(state[key])
    torch.save(state, tmp_path / "stale.pt")
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(tmp_path / "digits.npz", x=(digits.images / 16.0).astype(np.float32)[:, None], y=digits.target)
    return tmp_path / "stale.pt", tmp_path / "digits.npz"


def test_cli_recovers_accuracy_and_output_folds_without_arch(tmp_path):
    stale, data = _stale(tmp_path)
    out = tmp_path / "fresh.pt"
    runner = CliRunner()
    result = runner.invoke(
        main, ["stats", str(stale), "--arch", "cnn-bn", "--data", str(data), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["accuracy_after"] > report["accuracy_before"] + 0.05
    assert report["accuracy_after"] > 0.9
    assert report["bn_layers"] == 2 and len(report["changes"]) == 2
    assert max(c["mean_shift"] for c in report["changes"]) > 0.1
    folded = runner.invoke(main, ["fold", str(out), "-o", str(tmp_path / "m.onnx"), "--verify", "--no-power"])
    assert folded.exit_code == 0, folded.output
    # the output refuses to be replaced without --force
    again = runner.invoke(main, ["stats", str(stale), "--arch", "cnn-bn", "--data", str(data), "-o", str(out)])
    assert again.exit_code == 2


def _write_idx(path, array: np.ndarray, type_code: int = 0x08) -> None:
    with open(path, "wb") as handle:
        handle.write(bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        handle.write(array.astype(">u1" if type_code == 0x08 else array.dtype).tobytes())


def test_idx_files_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "images-idx3-ubyte", rng.integers(0, 256, (20, 8, 8)).astype(np.uint8))
    _write_idx(tmp_path / "labels-idx1-ubyte", rng.integers(0, 10, 20).astype(np.uint8))
    source = open_source(
        str(tmp_path / "images-idx3-ubyte"),
        batch_size=8,
        input_shape=(1, 8, 8),
        labels=str(tmp_path / "labels-idx1-ubyte"),
    )
    batches = list(source.batches)
    assert [tuple(x.shape) for x, _ in batches] == [(8, 1, 8, 8), (8, 1, 8, 8), (4, 1, 8, 8)]
    assert float(max(x.max() for x, _ in batches)) <= 1.0 and batches[0][1] is not None


def test_image_folder_written_by_the_test(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    source = open_source(
        str(tmp_path / "imgs"),
        batch_size=4,
        input_shape=(3, 8, 8),
        images=__import__("bnfold.training.sources", fromlist=["ImageOptions"]).ImageOptions(
            resize=9, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
        ),
    )
    batches = list(source.batches)
    assert sum(len(x) for x, _ in batches) == 10 and tuple(batches[0][0].shape) == (4, 3, 8, 8)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [0] * 5 + [1] * 5
    # without a crop the images do not fit the model: one line
    with pytest.raises(bnfold.BnfoldError, match="set --resize/--crop"):
        list(open_source(str(tmp_path / "imgs"), batch_size=4, input_shape=(3, 8, 8)).batches)


def test_user_callable_source(tmp_path, monkeypatch):
    (tmp_path / "calib.py").write_text(
        "import torch\ndef batches():\n    g = torch.Generator().manual_seed(0)\n"
        "    return [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]\n"
    )
    monkeypatch.chdir(tmp_path)
    model, shape = _models()["bn2d"]
    result = recompute_statistics(model, "calib:batches", batch_size=8, input_shape=shape, progress=False)
    assert result.statistics.batches == 3 and result.source == "callable"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: np.save(d / "bad.npy", np.zeros((4, 3, 8, 8), np.float32)), "do not fit the model's input"),
        (lambda d: np.save(d / "bad.npy", np.zeros((0, 1, 8, 8), np.float32)), "no samples"),
        (lambda d: (d / "bad.npy").write_bytes(b"not numpy"), "not a readable"),
        (lambda d: None, "no such file"),
    ],
    ids=["channel-mismatch", "empty", "unreadable", "missing"],
)
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, make, message):
    make(tmp_path)
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(
        main, ["stats", "models/cnn-bn.pt", "--data", str(tmp_path / "bad.npy"), "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_onnx_input_is_refused(cnn_files, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    result = CliRunner().invoke(
        main, ["stats", str(cnn_files / "good.onnx"), "--data", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.pt")]
    )
    assert result.exit_code == 2 and "need the PyTorch module" in result.output


def test_two_ranks_equal_one_process(tmp_path):
    stale, data = _stale(tmp_path)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["stats", str(stale), "--arch", "cnn-bn", "--data", str(data), "--batch-size", "50", "--json"]
    env = {**os.environ, "BNFOLD_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "bnfold", *common, "-o", str(one)], capture_output=True, text=True, env=env
    )
    assert single.returncode == 0, single.stderr[-1500:]
    ranks = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port: no clash with another job on the default one
            "--nproc-per-node",
            "2",
            "-m",
            "bnfold",
            *common,
            "-o",
            str(two),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ranks.returncode == 0, ranks.stderr[-1500:]
    report = json.loads(ranks.stdout[ranks.stdout.index("{") :])
    assert report["world_size"] == 2
    a = torch.load(one, weights_only=True)["state_dict"]
    b = torch.load(two, weights_only=True)["state_dict"]
    for key in a:
        if "running" in key:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_npz_decompression_bomb_is_refused(tmp_path):
    """A 64 MB array of zeros deflates to a few kB: refused before numpy inflates it (BNFOLD_MAX_ZIP_RATIO)."""
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((2**24, 1), np.float32))
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    out = tmp_path / "o.pt"
    result = CliRunner().invoke(
        main, ["stats", "models/cnn-bn.pt", "--data", str(tmp_path / "bomb.npz"), "-o", str(out)]
    )
    assert result.exit_code == 2 and "decompression bomb" in result.output and not out.exists()
    verify = CliRunner().invoke(
        main, ["verify", "models/cnn-bn.pt", "models/cnn-bn.pt", "--inputs", str(tmp_path / "bomb.npz")]
    )
    assert verify.exit_code == 2 and "decompression bomb" in verify.output
