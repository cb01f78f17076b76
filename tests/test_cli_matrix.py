"""The CLI contract, end to end through real subprocesses: every input format x every output suffix x the flags.

Each combination either works (the output loads, has no BN left, verification passed, --json is valid JSON,
--report matches it) or gives its documented one-line refusal (exit 2, nothing written).
"""

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomized
from safetensors.torch import save_file

import bnfold
from bnfold import zoo
from bnfold.deploy.export import export_keeping_bn

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "2,1,8,8"

# format -> (file, extra arguments)
FORMATS = {
    "trainer checkpoint": ("trained.pt", []),
    "state_dict": ("sd.pt", ["--arch", "cnn-bn"]),
    "nested state_dict": ("nested.pt", ["--arch", "cnn-bn"]),
    "DDP state_dict": ("ddp.pt", ["--arch", "cnn-bn"]),
    "safetensors": ("w.safetensors", ["--arch", "cnn-bn"]),
    "TorchScript": ("scripted.pt", ["--unsafe-pickle", "--input-shape", SHAPE]),
    "torch.export": ("prog.pt2", ["--unsafe-pickle"]),
    "ONNX (TorchScript exporter)": ("ts.onnx", []),
    "ONNX (dynamo exporter)": ("dynamo.onnx", []),
    "pickled module": ("pickled.pt", ["--unsafe-pickle", "--input-shape", SHAPE]),
}
SUFFIXES = (".onnx", ".pt", ".pt2", ".safetensors")
_ONNX_ONLY = "an ONNX input is written as .onnx"
_NEEDS_ARCH = "needs the architecture (--arch)"
# the documented refusals; every other combination must work
REFUSED = {
    ("ONNX (TorchScript exporter)", ".pt"): _ONNX_ONLY,
    ("ONNX (TorchScript exporter)", ".pt2"): _ONNX_ONLY,
    ("ONNX (TorchScript exporter)", ".safetensors"): _ONNX_ONLY,
    ("ONNX (dynamo exporter)", ".pt"): _ONNX_ONLY,
    ("ONNX (dynamo exporter)", ".pt2"): _ONNX_ONLY,
    ("ONNX (dynamo exporter)", ".safetensors"): _ONNX_ONLY,
    ("torch.export", ".pt"): "a .pt output needs the architecture",
    ("torch.export", ".safetensors"): _NEEDS_ARCH,
    ("pickled module", ".pt"): "a .pt output needs the architecture",
    ("pickled module", ".safetensors"): _NEEDS_ARCH,
    ("TorchScript", ".pt2"): "TorchScript",
    ("TorchScript", ".safetensors"): _NEEDS_ARCH,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    model = randomized(zoo.build("cnn-bn"))
    x = zoo.example_input("cnn-bn")
    state = model.state_dict()
    trained = torch.load(ROOT / "models" / "cnn-bn.pt", weights_only=True)
    torch.save(trained, d / "trained.pt")
    torch.save(state, d / "sd.pt")
    torch.save({"epoch": 3, "state_dict": state}, d / "nested.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, d / "ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "w.safetensors"))
    torch.jit.save(torch.jit.script(model), str(d / "scripted.pt"))
    torch.export.save(torch.export.export(model, (x,)), str(d / "prog.pt2"))
    (d / "ts.onnx").write_bytes(export_keeping_bn(model, (x,)).SerializeToString())
    torch.onnx.export(model, (x,), str(d / "dynamo.onnx"), dynamo=True, optimize=False, verbose=False)
    torch.save(model, d / "pickled.pt")
    return d


def _bnfold(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
    return done.returncode, done.stdout, done.stderr


def _bn_left(path: Path) -> int:
    loaded = bnfold.load(path, unsafe_pickle=True)
    if hasattr(loaded, "graph") and hasattr(loaded.graph, "node"):
        return sum(n.op_type == "BatchNormalization" for n in loaded.graph.node)
    graph = getattr(loaded, "graph", None)
    nodes = list(graph.nodes) if isinstance(graph, torch.fx.Graph) else []
    if isinstance(loaded, torch.jit.ScriptModule):
        nodes = [n.kind() for n in loaded.inlined_graph.nodes()]
    modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    return modules + sum("batch_norm" in str(getattr(n, "target", n)) for n in nodes)


def _combinations():
    return [(fmt, suffix) for fmt in FORMATS for suffix in SUFFIXES]


def test_every_format_and_suffix(inputs, tmp_path):
    """--verify --bench --json --report on each (format, output suffix): works, or its one-line refusal."""

    def run(combo):
        fmt, suffix = combo
        name, extra = FORMATS[fmt]
        folder = tmp_path / f"{abs(hash(combo))}"
        folder.mkdir()
        out, report = folder / f"out{suffix}", folder / "report.json"
        args = ["fold", str(inputs / name), "-o", str(out), *extra, "--verify", "--bench", "--iterations", "2"]
        args += ["--warmup", "0", "--json", "--report", str(report)]
        return combo, out, report, _bnfold(args, folder)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, _combinations()))
    outcomes = {}
    for (fmt, suffix), out, report, (code, stdout, stderr) in results:
        where = f"{fmt} -> {suffix}"
        assert "Traceback" not in stderr, (where, stderr)
        if (fmt, suffix) in REFUSED:
            errors = [line for line in stderr.splitlines() if line.startswith("bnfold: error:")]
            assert code == 2 and len(errors) == 1 and REFUSED[(fmt, suffix)] in errors[0], (where, code, stderr)
            assert not out.exists() and not report.exists(), where
            outcomes[where] = "refused"
            continue
        assert code == 0, (where, code, stderr)
        payload = json.loads(stdout)  # --json prints valid JSON, and nothing else on stdout
        assert payload == json.loads(report.read_text()), where
        assert payload["bn_folded"] == payload["bn_total"] == 2 or payload["input_format"] == "onnx", (where, payload)
        assert payload["verify"]["passed"] is True, (where, payload["verify"])
        assert payload["bench"]["compare"]["rows"], where
        assert _bn_left(out) == 0, where
        outcomes[where] = "ok"
    assert len(outcomes) == len(FORMATS) * len(SUFFIXES)


def test_quiet_and_force(inputs, tmp_path):
    """--quiet prints nothing; an existing output needs --force; --force replaces it."""

    def run(fmt):
        name, extra = FORMATS[fmt]
        folder = tmp_path / f"{abs(hash(fmt))}"
        folder.mkdir()
        out = folder / "out.onnx"
        first = _bnfold(["fold", str(inputs / name), "-o", str(out), *extra, "--quiet"], folder)
        again = _bnfold(["fold", str(inputs / name), "-o", str(out), *extra, "--quiet"], folder)
        forced = _bnfold(["fold", str(inputs / name), "-o", str(out), *extra, "--quiet", "--force"], folder)
        return fmt, first, again, forced

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for fmt, first, again, forced in pool.map(run, FORMATS):
            assert first[0] == 0 and first[1] == "" and first[2] == "", (fmt, first)
            assert again[0] == 2 and "pass --force" in again[2] and len(again[2].splitlines()) == 1, (fmt, again)
            assert forced[0] == 0 and forced[1] == "", (fmt, forced)


def test_verify_and_bench_need_an_input_shape_before_writing(inputs, tmp_path):
    for flag in ("--verify", "--bench"):
        out = tmp_path / "o.onnx"
        code, _, err = _bnfold(["fold", str(inputs / "pickled.pt"), "--unsafe-pickle", "-o", str(out), flag], tmp_path)
        assert code == 2 and "needs an input shape" in err and not out.exists(), err


def test_onnx_verify_summary_and_json(inputs, tmp_path):
    """The ONNX --verify summary (it crashed before) in text and JSON."""
    out = tmp_path / "o.onnx"
    code, stdout, err = _bnfold(["fold", str(inputs / "ts.onnx"), "-o", str(out), "--verify"], tmp_path)
    assert code == 0 and "verify (onnx): pass" in stdout, (stdout, err)
    code, stdout, _ = _bnfold(["fold", str(inputs / "ts.onnx"), "--verify", "--json"], tmp_path)
    assert code == 0 and json.loads(stdout)["verify"]["passed"] is True


def test_bench_uses_a_fixed_batch(tmp_path):
    """A model whose batch axis is fixed at 2 is benched at batch 2 when no batch size is asked for."""
    model = randomized(zoo.build("cnn-bn"))
    fixed = export_keeping_bn(model, (zoo.example_input("cnn-bn"),), dynamic_batch=False)
    (tmp_path / "fixed.onnx").write_bytes(fixed.SerializeToString())
    code, stdout, err = _bnfold(["bench", str(tmp_path / "fixed.onnx"), "--iterations", "2", "--json"], tmp_path)
    assert code == 0, err
    rows = json.loads(stdout)["results"][0]["rows"]
    assert {r["batch_size"] for r in rows} == {2}


def test_internal_errors_exit_3_with_one_line(tmp_path):
    """A bug (here: a monkeypatched crash) is exit 3 and one line; --debug shows the traceback."""
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import bnfold.pipeline as p\n"
        "def boom(*a, **k): raise ZeroDivisionError('planted')\n"
        "p.run_pipeline = boom\n"
        "from bnfold.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    model = tmp_path / "m.pt"
    torch.save(zoo.build("cnn-bn").state_dict(), model)
    for debug in ([], ["--debug"]):
        done = subprocess.run(
            [sys.executable, "-c", script, *debug, "inspect", str(model), "--arch", "cnn-bn"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 3, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("bnfold: internal error")]
        assert len(lines) == 1 and "ZeroDivisionError: planted" in lines[0]
        assert ("Traceback" in done.stderr) == bool(debug)
