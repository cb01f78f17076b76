"""bnfold train: data sources, self-describing checkpoints, torchrun with 2 CPU processes, the paper experiment."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.training.data import load_dataset
from bnfold.training.paper import PaperConfig, run_paper_experiment, write_figure
from bnfold.training.trainer import TrainConfig, train


def test_train_then_fold_without_arch(tmp_path):
    out = tmp_path / "ckpt.pt"
    result = CliRunner().invoke(main, ["train", "--arch", "cnn-bn", "--epochs", "2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["test_accuracy"] > 0.5
    payload = torch.load(out, weights_only=True)
    assert payload["arch"] == "cnn-bn" and payload["input_shape"] == [1, 8, 8]
    assert "Algorithm 2" in payload["statistics"]["method"] and payload["config"]["epochs"] == 2
    folded = CliRunner().invoke(main, ["fold", str(out), "-o", str(tmp_path / "f.onnx"), "--verify"])
    assert folded.exit_code == 0, folded.output
    assert "2 folded, 0 kept" in folded.output


def test_population_statistics_match_a_direct_pass():
    result = train(TrainConfig(arch="mlp-bn", epochs=1, batch_size=32), progress=False)
    data = load_dataset("digits")
    x = torch.from_numpy(data.x_train)
    first = result.model[0]
    with torch.no_grad():
        h = torch.cat([first(x[i : i + 32]) for i in range(0, len(x), 32)]).double()
    sizes = [len(x[i : i + 32]) for i in range(0, len(x), 32)]
    chunks = torch.split(h, sizes)
    within = sum(((c - c.mean(0)) ** 2).sum(0) for c in chunks)
    bn = result.model[1]
    assert torch.allclose(bn.running_mean.double(), h.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), within / (len(x) - len(sizes)), rtol=1e-5)


def test_mnist_idx_and_npz_sources(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes())
        with open(tmp_path / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes() + labels.tobytes())
    mnist = load_dataset(tmp_path)
    assert mnist.x_train.shape == (40, 784) and mnist.side == 28 and mnist.x_test.shape == (10, 784)
    result = train(TrainConfig(arch="mlp-bn", data=str(tmp_path), steps=3, batch_size=8), progress=False)
    assert result.config.arch_kwargs["in_features"] == 784
    np.savez(tmp_path / "d.npz", x=rng.random((30, 64)), y=rng.integers(0, 10, 30))
    assert load_dataset(tmp_path / "d.npz").x_train.shape == (24, 64)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09")
    with pytest.raises(BnfoldError, match="truncated"):
        load_dataset(tmp_path)
    with pytest.raises(BnfoldError, match="expected 'digits'"):
        load_dataset(tmp_path / "nothing.bin")


def test_two_cpu_processes_under_torchrun(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "bnfold",
        "train",
        "--arch",
        "resnet-tiny",
        "--epochs",
        "1",
        "-o",
        str(out),
        "--json",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(run.stdout[run.stdout.index("{") :])["metrics"]
    assert metrics["world_size"] == 2
    model = bnfold.load(out)
    # the first BN's input does not depend on batching: its pooled mean is the training-set mean
    data = load_dataset("digits")
    x, _ = data.tensors((1, 8, 8), "train")
    with torch.no_grad():
        first = model.stem[0](x).double()
    assert torch.allclose(model.stem[1].running_mean.double(), first.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    folded, report = bnfold.fold(model)
    assert report.bn_kept == 0
    assert bnfold.verify(model, folded, input_shapes=[(4, 1, 8, 8)]).passed


def test_paper_experiment_writes_figure_and_curves(tmp_path):
    result = run_paper_experiment(PaperConfig(steps=300, eval_every=100), progress=False)
    for key in ("without_bn", "with_bn"):
        curves = result[key]
        assert curves["step"] == [0, 100, 200, 300] and len(curves["p50"]) == 4
        assert all(a <= b <= c for a, b, c in zip(curves["p15"], curves["p50"], curves["p85"], strict=True))
    assert result["with_bn"]["accuracy"][-1] > result["without_bn"]["accuracy"][-1]
    write_figure(result, tmp_path / "fig.png", tmp_path / "fig.json")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "fig.json").read_text())["config"]["batch_size"] == 60


def test_bad_training_arguments():
    with pytest.raises(BnfoldError, match="batch size"):
        train(TrainConfig(batch_size=1), progress=False)
    with pytest.raises(BnfoldError, match="optimizer"):
        train(TrainConfig(optimizer="lamb"), progress=False)


def _fake_gpu_machine(monkeypatch, gpus):
    """torchrun's environment for 2 processes on a machine that shows ``gpus`` GPUs; returns the backends chosen."""
    from bnfold.training import distributed

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: chosen.append(f"cuda:{index}"))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", chosen.append)
    return distributed, chosen


def test_the_backend_follows_the_jobs_device_not_the_machine(monkeypatch):
    """On a GPU machine a CPU job joins with gloo (nccl cannot reduce CPU tensors); a GPU job with nccl."""
    distributed, chosen = _fake_gpu_machine(monkeypatch, gpus=2)
    distributed.start("cpu")
    assert chosen == ["gloo"]
    chosen.clear()
    distributed.start("cuda")
    assert chosen == ["cuda:1", "nccl"]  # each process on its own GPU
    chosen.clear()
    monkeypatch.setenv("BNFOLD_BACKEND", "gloo")
    distributed.start("cuda")
    assert chosen == ["cuda:1", "gloo"]


def test_more_processes_than_gpus_is_refused(monkeypatch):
    distributed, chosen = _fake_gpu_machine(monkeypatch, gpus=1)
    with pytest.raises(BnfoldError, match="one GPU per process: 2 processes on this node, 1 GPU"):
        distributed.start("cuda")
    assert chosen == []
    distributed, _ = _fake_gpu_machine(monkeypatch, gpus=0)
    with pytest.raises(BnfoldError, match="sees no CUDA GPU"):
        distributed.start("cuda")
