"""A file never makes bnfold import or call code the user did not name (README: Security)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import randomized

import bnfold
from bnfold import zoo
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("folded-pt", "trained-pt", "folded-safetensors")


def _state():
    return {k: v.clone() for k, v in randomized(zoo.build("cnn-bn")).state_dict().items()}


def _write(path: Path, kind: str, arch: str, kwargs, **extra) -> Path:
    """A bnfold self-describing file whose recipe says ``arch(**kwargs)``."""
    kwargs_text = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
    if kind == "folded-safetensors":
        from safetensors.torch import save_file

        meta = {"format": "bnfold.folded/1", "arch": arch, "arch_kwargs": kwargs_text, "replaced": "{}", **extra}
        save_file(_state(), str(path), metadata=meta)
        return path
    payload = {
        "format": "bnfold.folded/1" if kind == "folded-pt" else "bnfold.trained/1",
        "arch": arch,
        "arch_kwargs": kwargs_text,
        "state_dict": _state(),
    }
    payload.update({"replaced": {}} if kind == "folded-pt" else {"input_shape": [1, 8, 8]})
    payload.update(extra)
    torch.save(payload, path)
    return path


def _suffix(kind):
    return ".safetensors" if kind.endswith("safetensors") else ".pt"


def _entry_points(path: Path, out_dir: Path):
    """Every way a user hands bnfold a file: CLI commands and the Python API."""
    good = out_dir / "good.pt"
    torch.save(_state(), good)
    runner = CliRunner()
    yield "inspect", runner.invoke(main, ["inspect", str(path)])
    yield "fold", runner.invoke(main, ["fold", str(path), "-o", str(out_dir / "o.onnx"), "--input-shape", "2,1,8,8"])
    yield "verify", runner.invoke(main, ["verify", str(path), str(path)])
    yield "verify-user-arch", runner.invoke(main, ["verify", str(good), str(path), "--arch", "cnn-bn"])
    yield "bench", runner.invoke(main, ["bench", str(path), "--iterations", "1", "--warmup", "0"])
    for name, call in (
        ("load", lambda: bnfold.load(path)),
        ("run_pipeline", lambda: run_pipeline(path)),
    ):
        try:
            call()
            yield name, 0
        except BnfoldError as error:
            yield name, str(error)


@pytest.mark.parametrize("kind", FORMATS)
def test_a_file_naming_code_never_runs_it(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    crafted = _write(tmp_path / f"evil{_suffix(kind)}", kind, "subprocess:getoutput", {"cmd": f"touch {marker}"})
    outcomes = dict(_entry_points(crafted, tmp_path))
    assert not marker.exists()
    for name, outcome in outcomes.items():
        if name == "verify-user-arch":  # the user's --arch names what to build: the file's recipe is not used
            assert outcome.exit_code in (0, 1) and "Traceback" not in outcome.output, outcome.output
            continue
        if isinstance(outcome, str):
            assert "names code (subprocess:getoutput)" in outcome and "--trust-arch" in outcome, (name, outcome)
        else:
            assert outcome.exit_code == 2, (name, outcome.output)
            errors = [line for line in outcome.output.splitlines() if line.startswith("bnfold: error:")]
            assert len(errors) == 1 and "names code" in errors[0], (name, outcome.output)
            assert "Traceback" not in outcome.output
    assert not marker.exists()
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("kind", FORMATS)
def test_a_module_lying_next_to_the_file_is_not_imported(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "IMPORTED"
    (tmp_path / "nextdoor.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom bnfold import zoo\ndef build():\n    return zoo.build('cnn-bn')\n"
    )
    crafted = _write(tmp_path / f"m{_suffix(kind)}", kind, "nextdoor:build", {})
    with pytest.raises(BnfoldError, match="names code"):
        bnfold.load(crafted)
    assert not marker.exists()
    assert "nextdoor" not in sys.modules
    # the user names the code: accepted, and the working directory is not left on sys.path
    path_before = list(sys.path)
    model = bnfold.load(crafted, arch="nextdoor:build")
    assert marker.exists() and isinstance(model, torch.nn.Module)
    assert sys.path == path_before
    sys.modules.pop("nextdoor", None)


def test_trust_arch_builds_what_the_file_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trusted.py").write_text("from bnfold import zoo\ndef build(width):\n    return zoo.cnn_bn(width)\n")
    crafted = _write(tmp_path / "t.pt", "trained-pt", "trusted:build", {"width": 16})
    result = CliRunner().invoke(main, ["inspect", str(crafted), "--trust-arch"])
    assert result.exit_code == 0, result.output
    assert "2 folded" in result.output or "folds" in result.output or "BatchNorm" in result.output
    sys.modules.pop("trusted", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "bnfold.folded/9"}, "unknown bnfold format"),
        ({"arch": ""}, "no architecture name"),
        ({"arch": "../../etc:passwd"}, "neither a zoo name"),
        ({"arch_kwargs": "{bad"}, "arch_kwargs is not valid JSON"),
        ({"arch_kwargs": "[1, 2]"}, "arch_kwargs is not a JSON object"),
        ({"arch_kwargs": '{"width": 99999999999}'}, "implausibly large"),
        ({"arch_kwargs": '{"nope": 1}'}, "takes no argument 'nope'"),
        ({"arch_kwargs": '{"width": 32}'}, "has shape"),
        ({"replaced": "[1]"}, "'replaced' is not a map"),
        ({"replaced": "{oops"}, "replaced is not valid JSON"),
        ({"replaced": '{"0": "BatchNorm2d"}'}, "not a BatchNorm module"),
        ({"replaced": '{"9.x": "BatchNorm2d"}'}, "does not have"),
        ({"replaced": '{"__class__": "x"}'}, "does not have"),
    ],
)
@pytest.mark.parametrize("kind", ["folded-pt", "folded-safetensors"])
def test_malformed_folded_recipes_are_one_line_errors(kind, change, message, tmp_path):
    extra = dict(change)
    kwargs = extra.pop("arch_kwargs", "{}")
    if kind == "folded-pt" and "replaced" in extra and extra["replaced"][:2] in ('{"', "[1"):
        extra["replaced"] = json.loads(extra["replaced"])
    arch = extra.pop("arch", "cnn-bn")
    path = _write(tmp_path / f"bad{_suffix(kind)}", kind, arch, kwargs, **extra)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and message in errors[0], result.output


@pytest.mark.parametrize(
    ("drop", "set_", "message"),
    [
        ("input_shape", None, "input_shape is not a list"),
        ("state_dict", None, "holds no state_dict"),
        (None, {"input_shape": [100000, 100000, 100]}, "values an example"),
        (None, {"input_shape": [1, -8, 8]}, "input_shape is not a list"),
        (None, {"arch_kwargs": 5}, "arch_kwargs is not a JSON object"),
    ],
)
def test_malformed_trainer_checkpoints_are_one_line_errors(drop, set_, message, tmp_path):
    path = _write(tmp_path / "t.pt", "trained-pt", "cnn-bn", {})
    payload = torch.load(path, weights_only=True)
    if drop:
        del payload[drop]
    payload.update(set_ or {})
    torch.save(payload, path)
    result = CliRunner().invoke(main, ["fold", str(path), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "o.pt").exists()


def test_shipped_models_load_without_arch():
    for path in sorted((ROOT / "models").glob("*.pt")):
        loaded = bnfold.model_io.loading.load_detailed(path)
        assert loaded.arch in zoo.ZOO and isinstance(loaded.model, torch.nn.Module), path


def test_folded_outputs_of_zoo_models_reload_without_flags(tmp_path):
    source = _write(tmp_path / "in.pt", "trained-pt", "cnn-bn", {})
    for suffix in (".pt", ".safetensors"):
        out = tmp_path / f"folded{suffix}"
        result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
        assert result.exit_code == 0, result.output
        model = bnfold.load(out)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert os.environ.get("BNFOLD_NEVER_SET") is None
