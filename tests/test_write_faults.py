"""Faults while writing: each step of the write path fails in turn; SIGTERM mid-write.

Every case: one line, exit 2, no partial output, no temporary file left, the input unchanged.
"""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bnfold.cli import main

ROOT = Path(__file__).resolve().parents[1]
ERRNOS = [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EXDEV, errno.EIO]


@pytest.fixture
def inputs(cnn_files):
    return cnn_files


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fail(code):
    def raiser(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return raiser


# the steps of each write path, and the function each step calls
STEPS = {
    "state_dict -> .pt": {
        "temp file creation": "tempfile.mkstemp",
        "write": "torch.save",
        "fsync": "os.fsync",
        "rename": "os.replace",
    },
    "onnx -> .onnx": {
        "temp dir creation": "tempfile.mkdtemp",
        "write": "bnfold.onnx_fold.files._write_streamed",
        "fsync": "os.fsync",
        "rename": "os.replace",
    },
}
CASES = [(kind, step, code) for kind, steps in STEPS.items() for step in steps for code in ERRNOS]


@pytest.mark.parametrize(("kind", "step", "code"), CASES, ids=[f"{k}-{s}-{errno.errorcode[c]}" for k, s, c in CASES])
def test_each_write_step_failing(kind, step, code, inputs, tmp_path, monkeypatch):
    target = STEPS[kind][step]
    source = inputs / ("good.pt" if kind.startswith("state") else "good.onnx")
    out = tmp_path / ("o.pt" if kind.endswith(".pt") else "o.onnx")
    before = _digest(source)
    module_name, _, attr = target.rpartition(".")
    module = __import__(module_name, fromlist=[attr])
    monkeypatch.setattr(module, attr, _fail(code))
    args = ["fold", str(source), "-o", str(out)] + (["--arch", "cnn-bn"] if source.suffix == ".pt" else [])
    result = CliRunner().invoke(main, args)
    monkeypatch.undo()
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and "cannot write" in errors[0], result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
    assert _digest(source) == before


def test_an_unwritable_directory_is_refused_before_any_work(inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(main, ["fold", str(inputs / "good.onnx"), "-o", str(locked / "o.onnx")])
        if os.geteuid() == 0:  # root writes anywhere: the write itself must then succeed
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2 and "not writable" in result.output
    finally:
        locked.chmod(0o700)


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bnfold.cli import signal_handlers
        from bnfold.errors import BnfoldError
        from bnfold.model_io.outputs import atomic_write
        handlers = signal_handlers()  # entered for the rest of the script
        handlers.__enter__()

        def slow(tmp):
            with open(tmp, "wb") as f:
                f.write(b"partial")
                f.flush()
                print("writing", flush=True)
                time.sleep(30)

        try:
            atomic_write({str(tmp_path / "out.bin")!r}, slow)
        except BnfoldError as error:
            print("bnfold: error:", error, file=sys.stderr)
            sys.exit(2)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # mid-write: the temporary file exists
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2, err
    assert err.strip().splitlines() == ["bnfold: error: terminated by SIGTERM; no partial file is left"]
    assert list(tmp_path.iterdir()) == []


def test_an_in_process_command_gives_the_signal_handlers_back(inputs, tmp_path):
    """A test runner or pipeline that runs commands in-process keeps its own SIGTERM handler afterwards."""

    def mine(signum, frame):
        return None

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = CliRunner().invoke(main, ["inspect", str(inputs / "good.onnx")])
        assert result.exit_code == 0, result.output
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_to_the_cli_mid_fold(inputs, tmp_path):
    """The real command: SIGTERM while it works ends with exit 2, one line, and nothing written."""
    out = tmp_path / "o.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bnfold", "fold", str(inputs / "good.onnx"), "-o", str(out), "--bench"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    deadline = time.monotonic() + 60
    line = ""
    while "bench" not in line and time.monotonic() < deadline:  # wait until it is past loading
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err  # the bench stage runs for seconds: the signal lands before it ends
    assert [x for x in err.splitlines() if x.startswith("bnfold: error:")] == [
        "bnfold: error: terminated by SIGTERM; no partial file is left"
    ]
    assert not any(p.name.endswith(".tmp") or p.name.startswith(".o.onnx") for p in tmp_path.iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_scratch_file_that_cannot_be_written_is_one_line(code, tmp_path, monkeypatch):
    """Folded weights of a lazily read model go to a scratch file (TMPDIR); a full disk there is exit 2."""
    import onnx
    from test_no_torch import conv_bn_model

    import bnfold.onnx_fold.files as files
    import bnfold.onnx_fold.graph as graph

    source, out = tmp_path / "in.onnx", tmp_path / "out" / "o.onnx"
    onnx.save(conv_bn_model(channels=8), str(source))
    out.parent.mkdir()
    monkeypatch.setattr(files, "_LAZY_MIN_BYTES", 0)
    monkeypatch.setattr(graph, "SCRATCH_FROM_BYTES", 0)
    monkeypatch.setattr(files.tempfile, "mkstemp", _fail(code))
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    monkeypatch.undo()
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and "scratch file" in errors[0] and "free some space" in errors[0], result.output
    assert list(out.parent.iterdir()) == []
