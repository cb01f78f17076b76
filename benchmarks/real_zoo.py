"""The real-zoo sweep: every BN of timm and torchvision architectures, bnfold's two paths beside the peers.

Usage (needs .venv-zoo, made by scripts/zoo_env.sh: torch 2.14 + torchvision + timm):

    bash scripts/zoo_env.sh
    .venv-zoo/bin/python benchmarks/real_zoo.py --fast              # a dozen families, ~2 minutes
    .venv-zoo/bin/python benchmarks/real_zoo.py --source timm --limit 200 --peers all
    .venv-zoo/bin/python benchmarks/real_zoo.py --source timm --every 5 --offset 1   # one fifth, the 2nd of 5
    .venv-zoo/bin/python benchmarks/real_zoo.py --source timm --models-from benchmarks/real_zoo_timm.json --json x.json

Per model (random weights, randomised BN statistics, the smallest input it accepts among
32..224): BN total; BN left by ``bnfold.fold``; BN left by bnfold's ONNX pass on a
BN-keeping TorchScript export; BN left by ONNX Runtime's basic level, torch.fx ``fuse``,
and with ``--peers all`` also onnxsim and ``torch.onnx.export(dynamo=True)`` with its
optimizer; max error of each bnfold result vs float64 beside the original's own float32
error and the original's error when its weights move by half an ulp (float32 rounding of
a folded weight moves it that much; ``--add-noise`` fills it into older rows); where a
result is over 1.5x both, or ``bnfold.verify`` says MISMATCH, what verify says about it
(first divergence, and whether the layer there is ill-conditioned; ``--diagnose`` fills
older rows); fold seconds beside fx ``fuse``; crashes. Every BN left gets a reason class, and the sweep prints the
classes with counts. Writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx.experimental.optimization
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnfold  # noqa: E402
from bnfold.deploy.error_stats import error_stats  # noqa: E402
from bnfold.deploy.export import export_keeping_bn  # noqa: E402
from bnfold.deploy.runtimes import run_onnx, run_torch, run_torch64  # noqa: E402
from bnfold.report import reason_class  # noqa: E402
from bnfold.zoo import randomize_batchnorm  # noqa: E402

FAST = [
    "timm:resnet18",
    "timm:efficientnet_b0",
    "timm:mixnet_s",
    "timm:cspresnet50",
    "timm:rexnet_100",
    "timm:repvgg_a0",
    "timm:mobilenetv3_small_100",
    "timm:densenet121",
    "timm:regnetx_002",
    "timm:dla34",
    "tv:mobilenet_v2",
    "tv:resnet18",
    "tv:shufflenet_v2_x0_5",
    "tv:googlenet",
]


def build(spec: str) -> nn.Module:
    """``timm:name`` or ``tv:name``, random weights."""
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    try:  # detection and segmentation models would download backbone weights by default
        return torchvision.models.get_model(name, weights=None, weights_backbone=None)
    except TypeError:
        return torchvision.models.get_model(name, weights=None)


def bn_count(model: nn.Module) -> int:
    """BN modules, timm norm-act and frozen ones included."""
    from bnfold.torch_fold.recognise import bn_module

    return sum(1 for m in model.modules() if not isinstance(m, nn.Identity) and bn_module(m) is not None)


def fx_bn_count(graph_module: torch.fx.GraphModule) -> int:
    """BN left in an fx graph: calls of BN modules plus batch_norm functions (traced norm-act modules)."""
    from bnfold.torch_fold.recognise import bn_module

    functions = (torch.nn.functional.batch_norm, torch.batch_norm)
    modules = [n for n in graph_module.graph.nodes if n.op == "call_module"]
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in functions]
    return len(calls) + sum(bn_module(graph_module.get_submodule(n.target)) is not None for n in modules)


def onnx_bn(proto) -> int:  # noqa: ANN001
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def smallest_input(model: nn.Module, spec: str) -> torch.Tensor | None:
    channels = 3
    sizes = (32, 64, 96, 128, 160, 224)
    if spec.startswith("tv:") and any(k in spec for k in ("r3d", "mc3", "r2plus1d", "s3d", "mvit", "swin3d")):
        shapes = [(1, 3, frames, s, s) for frames in (8, 16) for s in sizes]
    else:
        shapes = [(1, channels, s, s) for s in sizes]
    own = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")  # timm's own size (halonet: 256)
    if own and len(own) == 3 and tuple(own[1:]) > (sizes[-1], sizes[-1]):
        shapes.append((1, *own))
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - the architecture decides what it accepts
            continue
    return None


def _ort_basic_session(proto, saved: str | None = None) -> object:  # noqa: ANN001
    """ONNX Runtime's CPU session at its basic level (its own Conv+BN fusion), optionally saving the optimized graph."""
    import onnxruntime as ort

    from bnfold.onnx_fold.files import session_source

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if saved:
        options.optimized_model_filepath = saved
        # weights beside the optimized file: a model over 2 GB cannot be written inline
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "basic.data")
    return ort.InferenceSession(session_source(proto), options, providers=["CPUExecutionProvider"])


def _ort_basic(proto) -> int:  # noqa: ANN001
    """BN left in the graph ONNX Runtime's basic level saves."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        saved = str(Path(tmp) / "basic.onnx")
        _ort_basic_session(proto, saved)
        return onnx_bn(onnx.load(saved, load_external_data=False))


def _ort_basic_outputs(proto, inputs: list) -> list:  # noqa: ANN001
    """Outputs of ONNX Runtime's basic level (its Conv+BN fusion computed in float32) on ``inputs``."""
    session = _ort_basic_session(proto)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))


def _peer_errors(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
    """Fill ``err_fuse`` (torch.fx ``fuse``, weights folded in float32) and ``err_ort_basic`` (ONNX Runtime's basic
    level on the BN-keeping export): the peers' own errors on the sweep's inputs, beside bnfold's two results."""
    truths: dict = {}
    try:
        fused = torch.fx.experimental.optimization.fuse(copy.deepcopy(model))
        row["err_fuse"] = _errors(spec, model, x, fused, truths=truths)[0]
        del fused
    except Exception as error:  # noqa: BLE001 - a peer failing is a result
        row["err_fuse"] = f"failed: {type(error).__name__}"
    try:
        xo = torch.randn(row["input_onnx"], generator=torch.Generator().manual_seed(0)) if "input_onnx" in row else x
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            kept = export_keeping_bn(model, (xo,))
        worst = None
        for d, xi in enumerate(_inputs(xo)):
            worst = _worst(_ort_basic_outputs(kept, [xi.numpy()]), _truth(spec, model, xo, d, False, truths), worst)
        row["err_ort_basic"] = worst
    except Exception as error:  # noqa: BLE001
        row["err_ort_basic"] = f"failed: {type(error).__name__}: {str(error)[:100]}"


def _add_peer_errors(path: Path, every: int = 0) -> None:
    """Add the peers' errors (:func:`_peer_errors`) to the rows of ``path`` over 1.5x their own error, and with
    ``every`` to every ``every``-th row (marked ``peer_sample``: an unbiased sample for rates), in place."""
    if every:  # marked first, so the sample is the same whichever rows are measured already
        rows = json.loads(path.read_text())
        for i, row in enumerate(rows):
            if i % every == 0 and row.get("bn_total") and not row.get("lean"):
                row["peer_sample"] = True
        _write_rows(path, rows)
    _fill_rows(
        path,
        lambda row: (_over(row) or bool(row.get("peer_sample"))) and "err_ort_basic" not in row,
        _peer_errors,
        lambda row: (
            f"own {row.get('err_own')} / ONNX own {row.get('err_onnx_own')}; bnfold torch "
            f"{row.get('err_torch')}, fx fuse {row['err_fuse']}; bnfold ONNX {row.get('err_onnx')}, ORT basic "
            f"{row['err_ort_basic']}"
        ),
    )


def _onnxsim(proto) -> int:  # noqa: ANN001
    import onnxsim

    simplified, _ = onnxsim.simplify(proto)
    return onnx_bn(simplified)


def _dynamo(model: nn.Module, x: torch.Tensor) -> int:
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=True, verbose=False)
    return onnx_bn(program.model_proto)


DRAWS = 3  # seeded inputs per error measurement: one input's max error is a noisy statistic


class DetectionProbe(nn.Module):
    """What a torchvision detector computes before its steps that jump (top-k, score threshold, NMS).

    With random weights a detector's boxes are empty or chosen among near-ties, so its final output
    says nothing about a fold. The probe returns the backbone's features of the transformed image
    and the dense head's outputs on them (RPN head, RetinaNet / FCOS / SSD head): where its BN live.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.detector
        images, _ = d.transform(list(x))
        features = d.backbone(images.tensors)
        features = list(features.values()) if isinstance(features, dict) else [features]
        head = d.rpn.head if hasattr(d, "rpn") else d.head
        return (*features, *torch.utils._pytree.tree_leaves(head(features)))


def probe(spec: str, model: nn.Module) -> nn.Module:
    """The module whose outputs an error is measured on: a detector's :class:`DetectionProbe`, else the model."""
    return DetectionProbe(model) if spec.startswith("tv:") and hasattr(model, "transform") else model


def _worst(got: list, truth: list, worst: float | None = None) -> float | None:
    """The largest error of outputs ``got`` vs ``truth`` (of each output's scale) and ``worst``; empty ones skipped."""
    for g, t in zip(got, truth, strict=True):
        if t.size:
            worst = max(worst or 0.0, error_stats(g, t).scaled_max)
    return worst


def _errors(
    spec: str, model: nn.Module, x: torch.Tensor, *candidates: object, truths: dict | None = None
) -> list[float | None]:
    """Max error of each candidate (a module, or ONNX on ONNX Runtime's CPU) vs ``model`` in float64.

    Of the output's scale, the largest over the outputs and over ``DRAWS`` seeded inputs of ``x``'s
    shape (``x`` first); the float64 truth is computed once per input and kept (outputs only; pass
    ``truths``, a dict, to share them between calls on the same model: each costs a float64 copy). A
    candidate may be a ``functools.partial`` that builds it: built when its turn comes and dropped
    after, so a large model's copies are not all held at once. None where every output is empty (a
    detector's boxes: its modules are measured through :func:`probe`, its ONNX file cannot be).
    """
    truths = {} if truths is None else truths
    worst: list[float | None] = []
    for candidate in candidates:
        c = candidate() if isinstance(candidate, functools.partial) else candidate
        module, error = isinstance(c, nn.Module), None  # a module is measured through its probe, ONNX is not
        for d, xi in enumerate(_inputs(x)):
            inputs = [xi.numpy()]
            got = run_torch(probe(spec, c), inputs) if module else run_onnx(c, inputs, "ort-cpu")
            error = _worst(got, _truth(spec, model, x, d, module, truths), error)
        worst.append(error)
        del c
    return worst


HALF_ULP = 2.0**-24  # float32 rounding moves a value by at most this much of itself
NOISE_DRAWS = 2


HALF_ULP64 = 2.0**-53  # the same for float64
FOLD64_TOL = 1e-9  # a float64 fold error above this (of scale) gets the float64 half-ulp yardstick


def _half_ulp_noise(
    model: nn.Module, seed: int, relative: float = HALF_ULP, dtype: torch.dtype | None = None
) -> nn.Module:
    """A copy of ``model`` (in ``dtype`` if given) with every float parameter and buffer moved by a random relative
    +-``relative`` (2**-24 by default).

    That is as far as rounding a float64-computed weight to float32 moves it (what storing a
    fold's weights does), so the copy's error is a yardstick of how much float32 weight rounding
    alone costs this model: chaotic random-weight models turn half-ulp changes into large errors.
    With ``dtype=torch.float64`` and ``relative=HALF_ULP64`` it is the same yardstick for a fold computed in float64.
    """
    noisy = copy.deepcopy(model)
    if dtype is not None:
        noisy = noisy.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*noisy.parameters(), *noisy.buffers()]:
            if tensor.is_floating_point():
                tensor.mul_(1 + (torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1) * relative)
    return noisy


def _noise_error64(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
    """Fill ``err_halfulp64``: the original in float64 with every weight moved by a float64 half ulp, vs itself.

    The yardstick for a float64 fold error above ``FOLD64_TOL``: a model that turns a 1e-16 weight change into
    that much output change amplifies float64 rounding the same way, so its float64 fold cannot be closer.
    """
    truth = _truth(spec, model, x, 0, True, {})
    worst = None
    for k in range(NOISE_DRAWS):
        noisy = _half_ulp_noise(model, 100 + k, HALF_ULP64, torch.float64)
        worst = _worst(run_torch(probe(spec, noisy), [x.double().numpy()]), truth, worst)
        del noisy
    row["err_halfulp64"] = worst


def _noise_error(spec: str, model: nn.Module, x: torch.Tensor) -> float | None:
    """The largest error of the original under half-ulp weight noise (:func:`_half_ulp_noise`, a few draws)."""
    errors = _errors(spec, model, x, *(functools.partial(_half_ulp_noise, model, 100 + k) for k in range(NOISE_DRAWS)))
    return max((e for e in errors if e is not None), default=None)


def _truth(spec: str, model: nn.Module, x: torch.Tensor, draw: int, probed: bool, truths: dict) -> list:
    """The float64 outputs of ``model`` (through :func:`probe` if ``probed``) on input ``draw`` of :func:`_inputs`.

    Kept in ``truths`` (outputs only) so that every measurement on one model shares them: each costs a float64 copy.
    """
    probed = probed and probe(spec, model) is not model  # only a detector's probe computes something else
    key = (tuple(x.shape), draw, probed)
    if key not in truths:
        truths[key] = run_torch64(probe(spec, model) if probed else model, [_inputs(x)[draw].numpy()])
    return truths[key]


def _aten(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
    """The torch.export path: ``bnfold.fold`` on the program's module (aten ops); BN left, error, seconds.

    Fills ``bn_left_aten``, ``err_aten`` (of the output's scale vs float64, on ``x``) and ``aten_s``, or
    ``aten_crash`` where torch.export or the fold fails; the PyTorch path's BN count is the yardstick.
    """
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            program = torch.export.export(probe(spec, model), (x,)).module()
    except Exception as error:  # noqa: BLE001 - a model torch.export cannot capture is a result, not ours
        row["aten_crash"] = f"torch.export: {type(error).__name__}: {str(error)[:120]}"
        return
    try:
        start = time.perf_counter()
        folded, report = bnfold.fold(program)
        row["aten_s"] = round(time.perf_counter() - start, 3)
    except Exception as error:  # noqa: BLE001
        row["aten_crash"] = f"bnfold.fold: {type(error).__name__}: {str(error)[:120]}"
        return
    row["bn_left_aten"] = report.bn_kept
    row["reasons_aten"] = [reason_class(e.reason) for e in report.layers if not e.folded]
    row["err_aten"] = _worst(run_torch(folded, [x.numpy()]), _truth(spec, model, x, 0, True, {}))


def _onnx_dynamo(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
    """bnfold's ONNX pass on the dynamo exporter's file without its optimizer (BN kept; other producers' idioms).

    Fills ``bn_left_onnx_dynamo`` and ``err_onnx_dynamo`` (of the output's scale vs float64 on ``x``, ONNX
    Runtime CPU), or ``onnx_dynamo_crash``. The TorchScript export the sweep folds first is the yardstick.
    """
    from bnfold.deploy.export import _dynamo as dynamo_export

    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            exported = dynamo_export(model, (x,), None, dynamic_batch=False, optimize=False)
    except Exception as error:  # noqa: BLE001 - a model the exporter cannot take is a result, not ours
        row["onnx_dynamo_crash"] = f"export: {type(error).__name__}: {str(error)[:120]}"
        return
    try:
        folded, report = bnfold.fold_onnx(exported)
    except Exception as error:  # noqa: BLE001
        row["onnx_dynamo_crash"] = f"bnfold.fold_onnx: {type(error).__name__}: {str(error)[:120]}"
        return
    row["bn_left_onnx_dynamo"] = report.bn_kept
    row["reasons_onnx_dynamo"] = [reason_class(e.reason) for e in report.layers if not e.folded]
    try:
        run_onnx(exported, [x.numpy()], "ort-cpu")
    except Exception as error:  # noqa: BLE001 - the exporter's file itself is broken (tv:mc3_18's Conv3d bias)
        row["onnx_dynamo_crash"] = f"the export itself does not run in ONNX Runtime: {str(error)[:160]}"
        return
    row["err_onnx_dynamo"] = _worst(run_onnx(folded, [x.numpy()], "ort-cpu"), _truth(spec, model, x, 0, False, {}))


def _fill_rows(
    path: Path,
    wanted: Callable[[dict], bool],
    measure: Callable[[str, nn.Module, torch.Tensor, dict], None],
    say: Callable[[dict], str],
    onnx_input: bool = False,
) -> None:
    """Rebuild each row of ``path`` that is ``wanted`` as the sweep built it, ``measure`` it, print ``say``, in place.

    ``onnx_input``: the input the ONNX export was made at (``input_onnx``) where the row has one.
    """
    rows = json.loads(path.read_text())
    for row in rows:
        if not wanted(row):
            continue
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            model, x = _rebuild(row)
            if onnx_input and "input_onnx" in row:
                x = torch.randn(row["input_onnx"], generator=torch.Generator().manual_seed(0))
            measure(row["model"], model, x, row)
        print(f"{row['model']}: {say(row)}", flush=True)
        _write_rows(path, rows)


def _fill(path: Path, key: str, measure: Callable[[str, nn.Module, torch.Tensor, dict], None]) -> None:
    """Fill the columns ``measure`` writes (``key`` among them) in the rows of ``path`` that lack them, in place."""
    crash = key.replace("bn_left_", "") + "_crash"
    _fill_rows(
        path,
        lambda row: not (key in row or crash in row or not row.get("bn_total") or "crash" in row),
        measure,
        lambda row: (
            f"{key} {row.get(key, row.get(crash))} (PyTorch path {row.get('bn_left_torch')}, ONNX pass "
            f"{row.get('bn_left_onnx')})"
        ),
        onnx_input=key != "bn_left_aten",
    )


def _fold_error64(
    spec: str, model: nn.Module, x: torch.Tensor, truths: dict | None = None
) -> tuple[float | None, float | None]:
    """The fold's own error without float32 rounding, and what storing its weights in float32 costs.

    A float64 copy is folded and compared with the original in float64: an exact fold leaves only
    float64 rounding (about 1e-15 of the output's scale, more where the model amplifies rounding); a
    wrong fold shows at any precision. Then the folded weights are rounded to float32 and the model
    run again in float64: that error is the floor of any float32 folded model (its weights are new
    numbers, each rounded once), on top of the original's own float32 arithmetic error.

    Returns:
        ``(fold error, weight-rounding error)``, each the largest over the outputs, of each output's scale.
    """
    inputs = [x.numpy()]
    truth = _truth(spec, model, x, 0, True, truths if truths is not None else {})
    folded64, _ = bnfold.fold(copy.deepcopy(model).double(), (x.double(),), inplace=True)  # one float64 copy
    exact = _worst(run_torch(probe(spec, folded64), inputs), truth)  # run_torch: in the model's dtype
    with torch.no_grad():
        for tensor in list(folded64.parameters()) + list(folded64.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.float().double())
    return exact, _worst(run_torch(probe(spec, folded64), inputs), truth)


def _inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The ``DRAWS`` seeded inputs :func:`_errors` measures on (``x`` first)."""
    return [x if d == 0 else torch.randn(x.shape, generator=torch.Generator().manual_seed(d)) for d in range(DRAWS)]


def diagnosis(reference: object, candidate: object, x: torch.Tensor) -> str:
    """What ``bnfold.verify`` says on each measured input: the first divergence (and whether the layer there is
    ill-conditioned), or that it passes on all of them."""
    for k, xi in enumerate(_inputs(x)):
        result = bnfold.verify(reference, candidate, inputs=[xi.numpy()], power=False)
        if not result.passed:
            where = result.runtimes[0].first_divergence or "no layer singled out"
            return f"input {k}: MISMATCH, {where}"[:600]
    return f"verify passes on all {DRAWS} inputs"


def _verdict(reference: object, candidate: object, x: torch.Tensor) -> tuple[bool, str | None]:
    """``bnfold.verify`` on its own seeded draws of ``x``'s shape: the verdict, and on a mismatch where it says the
    models part."""
    result = bnfold.verify(reference, candidate, input_shapes=[tuple(x.shape)], power=False)
    return result.passed, None if result.passed else (result.runtimes[0].first_divergence or "no layer singled out")


def _beyond(row: dict, path: str) -> bool:
    """Whether a path's error is over 1.5x both the original's own error and its half-ulp noise error."""
    err, own = ("err_torch", "err_own") if path == "torch" else ("err_onnx", "err_onnx_own")
    if row.get("err_halfulp") is None:
        return False
    return bool(_num(row, own, 0.0)) and _num(row, err, 0.0) > 1.5 * max(_num(row, own), _num(row, "err_halfulp"))


def sweep_one(spec: str, peers: str, lean: bool = False) -> dict:
    """Everything measured for one architecture (``lean``: only what :func:`_measure_lean` measures)."""
    row: dict = {"model": spec}
    started = time.perf_counter()
    try:
        return _measure_lean(spec, row) if lean else _measure(spec, peers, row)
    finally:
        row["sweep_s"] = round(time.perf_counter() - started, 1)


def _torch_path(spec: str, row: dict, inplace: bool) -> tuple[nn.Module, torch.Tensor, nn.Module, object] | None:
    """Build the model (seeded), randomise its BN statistics, pick its input and fold it: the PyTorch-path columns.

    Returns:
        ``(model, input, folded, report)``, or None when there is nothing to fold or no input fits (``row`` says).
    """
    torch.manual_seed(0)  # the same random weights on every run: rows compare across runs
    model = build(spec).eval()
    row["bn_total"] = bn_count(model)
    if not row["bn_total"]:
        return None
    randomize_batchnorm(model)
    x = smallest_input(model, spec)
    if x is None:
        row["crash"] = "no input size in 32..224 (or the model's own) accepted"
        return None
    row["input"] = list(x.shape)
    start = time.perf_counter()
    folded, report = bnfold.fold(model, (x,), inplace=inplace)
    row["fold_s"] = round(time.perf_counter() - start, 3)
    row["bn_left_torch"] = report.bn_kept
    # BN modules that forward never calls in eval (an aux head): not in any peer's graph, so counted apart
    row["bn_unused_torch"] = sum(1 for e in report.layers if not e.folded and "not called by forward" in e.reason)
    row["reasons_torch"] = [reason_class(e.reason) for e in report.layers if not e.folded]
    row["reasons_torch_text"] = [f"{e.name}: {e.reason}"[:200] for e in report.layers if not e.folded]
    return model, x, folded, report


def _measure_lean(spec: str, row: dict) -> dict:
    """For a model too large for the full sweep: BN total, BN left by ``bnfold.fold`` in place, fold seconds.

    No copies (no float64 truth, no peers, no export), so the peak is about the model and one forward; the
    row says ``lean`` and has no errors.
    """
    import resource

    row["lean"] = True
    folded = _torch_path(spec, row, inplace=True)
    if folded is not None:
        row["params_mb"] = round(sum(p.numel() * p.element_size() for p in folded[0].parameters()) / 2**20)
        row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _measure(spec: str, peers: str, row: dict) -> dict:
    done = _torch_path(spec, row, inplace=False)
    if done is None:
        return row
    model, x, folded, _ = done
    noisy = [functools.partial(_half_ulp_noise, model, 100 + k) for k in range(NOISE_DRAWS)]
    truths: dict = {}  # the float64 outputs, shared by every error measured on this model
    row["err_torch"], row["err_own"], *noise = _errors(spec, model, x, folded, model, *noisy, truths=truths)
    row["err_halfulp"] = max((e for e in noise if e is not None), default=None)
    try:
        row["err_torch64"], row["err_weights32"] = _fold_error64(spec, model, x, truths)
    except Exception as error:  # noqa: BLE001 - a model that does not run in float64 (a fixed dtype inside)
        row["err_torch64"] = f"failed: {type(error).__name__}: {str(error)[:100]}"
    if isinstance(row.get("err_torch64"), float) and row["err_torch64"] > FOLD64_TOL:
        _noise_error64(spec, model, x, row)
    # verify's verdict only: its power measurement (planted weight changes) would double the sweep's time
    row["verify_torch"], said = _verdict(model, folded, x)
    if said:
        row["diagnosis_verify_torch"] = said
    if _beyond(row, "torch"):
        row["diagnosis_torch"] = diagnosis(model, folded, x)
    del folded  # each copy of the model held to the end is one more model size of peak memory
    _aten(spec, model, x, row)
    try:
        start = time.perf_counter()
        fused = torch.fx.experimental.optimization.fuse(copy.deepcopy(model))
        row["fuse_s"] = round(time.perf_counter() - start, 3)
        row["bn_left_fuse"] = fx_bn_count(fused)
        del fused
    except Exception as error:  # noqa: BLE001 - a peer failing is a result
        row["bn_left_fuse"] = f"failed: {type(error).__name__}"
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            try:
                kept = export_keeping_bn(model, (x,))
            except Exception:  # noqa: BLE001 - the exporter may need a larger input than the model (adaptive pools)
                x = torch.randn((*x.shape[:-2], 224, 224), generator=torch.Generator().manual_seed(0))
                kept = export_keeping_bn(model, (x,))
                row["input_onnx"] = list(x.shape)
        row["bn_onnx_export"] = onnx_bn(kept)
        folded_proto, onnx_report = bnfold.fold_onnx(kept)
        row["bn_left_onnx"] = onnx_bn(folded_proto)
        row["reasons_onnx"] = [reason_class(e.reason) for e in onnx_report.layers if not e.folded]
        row["err_onnx"], row["err_onnx_own"] = _errors(spec, model, x, folded_proto, kept, truths=truths)
        row["verify_onnx"] = bnfold.verify(model, folded_proto, input_shapes=[tuple(x.shape)], power=False).passed
        if not row["verify_onnx"]:  # the torch original cannot be compared layer by layer with ONNX: the export can
            row["diagnosis_verify_onnx"] = _onnx_verdict(model, kept, folded_proto, x)
        if _beyond(row, "onnx"):
            row["diagnosis_onnx"] = diagnosis(kept, folded_proto, x)
        try:
            row["bn_left_ort_basic"] = _ort_basic(kept)
        except Exception as error:  # noqa: BLE001 - a peer failing is a result (it cannot save a model over 2 GB)
            row["bn_left_ort_basic"] = f"failed: {type(error).__name__}: {str(error)[:120]}"
        if peers == "all":
            row["bn_left_onnxsim"] = _onnxsim(kept)
    except Exception as error:  # noqa: BLE001
        row["onnx_crash"] = f"{type(error).__name__}: {str(error)[:160]}"
    if peers == "all":
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                row["bn_left_dynamo"] = _dynamo(model, x)
        except Exception as error:  # noqa: BLE001
            row["bn_left_dynamo"] = f"failed: {type(error).__name__}"
    return row


class _quiet:  # noqa: N801 - a context manager used like a function
    def __enter__(self) -> None:
        self._out, self._err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._out, self._err


def specs(source: str) -> list[str]:
    """Every architecture name of the source(s)."""
    names = []
    if source in ("timm", "all"):
        import timm

        names += [f"timm:{n}" for n in timm.list_models()]
    if source in ("torchvision", "all"):
        import torchvision

        for module in (
            torchvision.models,
            torchvision.models.detection,
            torchvision.models.segmentation,
            torchvision.models.video,
        ):
            names += [f"tv:{n}" for n in torchvision.models.list_models(module=module)]
    return names


def has_bn(spec: str) -> bool:
    """Whether the architecture has a BN module, built on the meta device (no memory, no weights).

    An architecture that does not build there is kept: the sweep itself then says what went wrong.
    """
    try:
        with warnings.catch_warnings(), _quiet(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return bn_count(build(spec)) > 0
    except Exception:  # noqa: BLE001
        return True


def _models_of(paths: list[str]) -> set[str]:
    return {row["model"] for path in paths for row in json.loads(Path(path).read_text())}


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Write the JSON whole after each model (a stopped sweep keeps what it measured), atomically."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(rows, indent=1) + "\n")
    partial.replace(path)


def _num(row: dict, key: str, default: float = float("nan")) -> float:
    """A measured number of the row; ``default`` where it is absent, None or a failure text."""
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else default


def _print_row(row: dict) -> None:
    spec = row["model"]
    if "crash" in row:
        print(f"{spec:<34} crash: {row['crash'][:100]}", flush=True)
    if not row.get("bn_total") or "crash" in row:
        return

    def cell(key: str, width: int = 4) -> str:
        value = row.get(key, "")
        return f"{value:>{width}}" if not isinstance(value, str) else f"{'x':>{width}}"

    print(
        f"{spec:<34} {row['bn_total']:>4} {cell('bn_left_torch', 5)} {cell('bn_left_onnx')} "
        f"{cell('bn_left_ort_basic')} {cell('bn_left_fuse')} {cell('bn_left_onnxsim')} {cell('bn_left_dynamo')} "
        f"{_num(row, 'err_torch'):>9.2e} {_num(row, 'err_onnx'):>9.2e} "
        f"{_num(row, 'err_own'):>9.2e} {row.get('fold_s', 0):>6.2f} {row.get('fuse_s', 0):>6.2f} "
        f"{_num(row, 'err_torch64'):>8.1e}",
        flush=True,
    )


PEERS = ("bn_left_ort_basic", "bn_left_fuse", "bn_left_onnxsim", "bn_left_dynamo")


def behind_a_peer(row: dict) -> list[str]:
    """Where a bnfold path leaves more BN than a peer on the same model.

    The PyTorch path is counted without the BN modules forward never calls (no peer's graph has them).
    """
    peers = {key: row[key] for key in PEERS if isinstance(row.get(key), int)}
    if not peers:
        return []
    best = min(peers.values())
    ours = {
        "bnfold.fold": row.get("bn_left_torch", 0) - row.get("bn_unused_torch", 0)
        if isinstance(row.get("bn_left_torch"), int)
        else None,
        "bnfold ONNX": row.get("bn_left_onnx"),
    }
    return [
        f"{row['model']}: {name} {left} > {min(peers, key=peers.get)[8:]} {best}"
        for name, left in ours.items()
        if isinstance(left, int) and left > best
    ]


def _peer(row: dict, path: str) -> tuple[str, float | None]:
    """The peer beside a bnfold path (fx ``fuse`` beside the PyTorch path, ORT basic beside the ONNX pass) and its
    error, or None where unmeasured or where it folded fewer BN than bnfold (a less changed model: not like for like).
    """
    name, err, left = (
        ("fx fuse", "err_fuse", "bn_left_fuse")
        if path == "torch"
        else (
            "ORT basic",
            "err_ort_basic",
            "bn_left_ort_basic",
        )
    )
    like = isinstance(row.get(left), int) and row[left] <= _num(row, f"bn_left_{path}", -1)
    return name, row[err] if like and isinstance(row.get(err), float) else None


def summarize(rows: list[dict]) -> None:
    """Print the totals, the failures and the reason classes of a sweep's rows."""
    ran = [r for r in rows if r.get("bn_total") and "crash" not in r]
    print(
        f"\n{len(rows)} architectures, {len(ran)} with BN ran, "
        f"{sum(1 for r in rows if 'crash' in r)} crashed (build or input), "
        f"{sum(1 for r in rows if r.get('bn_total') == 0)} without BN"
        + (
            f"; {lean} of them lean (too large for the full sweep: BN counts only)"
            if (lean := sum(1 for r in ran if r.get("lean")))
            else ""
        )
    )
    for key, label in (
        ("bn_total", "BN total"),
        ("bn_left_torch", "left by bnfold.fold"),
        ("bn_unused_torch", "  of which never run"),
        ("bn_left_aten", "left by bnfold.fold, aten"),
        ("bn_left_onnx", "left by bnfold ONNX pass"),
        ("bn_left_ort_basic", "left by ORT basic"),
        ("bn_left_fuse", "left by fx fuse"),
        ("bn_left_onnxsim", "left by onnxsim"),
        ("bn_left_dynamo", "left by dynamo export"),
    ):
        values = [r[key] for r in ran if isinstance(r.get(key), int)]
        if values:
            print(f"  {label:<26} {sum(values):>6}  (over {len(values)} models)")
    onnx_failed = [f"{r['model']} ({r['onnx_crash'][:60]})" for r in ran if "onnx_crash" in r]
    print(f"  ONNX export or pass failed: {len(onnx_failed)} {onnx_failed or ''}")
    behind = [line for r in ran for line in behind_a_peer(r)]
    print(f"  a bnfold path leaves more BN than a peer: {behind or 'none'}")
    paths = [
        (r["model"], r["bn_left_torch"] - r.get("bn_unused_torch", 0), r["bn_left_onnx"])
        for r in ran
        if isinstance(r.get("bn_left_torch"), int) and isinstance(r.get("bn_left_onnx"), int)
    ]
    for label, pick in (("the ONNX pass", lambda t, o: o > t), ("bnfold.fold", lambda t, o: t > o)):
        over = [f"{m} ({t} / {o})" for m, t, o in paths if pick(t, o)]
        print(f"  {label} leaves more BN than the other bnfold path (PyTorch / ONNX): {over or 'none'}")
    dyn = [
        r
        for r in ran
        if isinstance(r.get("bn_left_onnx_dynamo"), int)
        and isinstance(r.get("bn_left_onnx"), int)
        and "onnx_dynamo_crash" not in r
    ]
    if dyn or any("onnx_dynamo_crash" in r for r in ran):
        more = [
            f"{r['model']} ({r['bn_left_onnx_dynamo']} vs {r['bn_left_onnx']})"
            for r in dyn
            if r["bn_left_onnx_dynamo"] > r["bn_left_onnx"]
        ]
        errors = [r["err_onnx_dynamo"] for r in dyn if isinstance(r.get("err_onnx_dynamo"), float)]
        largest = f", largest finite error {max(e for e in errors if e < float('inf')):.1e} of scale" if errors else ""
        broken = [f"{r['model']} ({r['onnx_dynamo_crash'][:50]})" for r in ran if "onnx_dynamo_crash" in r]
        print(
            f"  ONNX pass on the dynamo export ({len(dyn)} models, {sum(r['bn_total'] for r in dyn)} BN, "
            f"{sum(r['bn_left_onnx_dynamo'] for r in dyn)} left{largest}): leaves more BN than on the TorchScript "
            f"export on {more or 'none'}; export failed or does not run in ONNX Runtime: {broken or 'none'}"
        )
    aten = [r for r in ran if isinstance(r.get("bn_left_aten"), int)]
    if aten or any("aten_crash" in r for r in ran):
        worse = [
            f"{r['model']} ({r['bn_left_aten']} vs {r['bn_left_torch'] - r.get('bn_unused_torch', 0)})"
            for r in aten
            if isinstance(r.get("bn_left_torch"), int)
            and r["bn_left_aten"] > r["bn_left_torch"] - r.get("bn_unused_torch", 0)
        ]
        crashed = [f"{r['model']} ({r['aten_crash'][:80]})" for r in ran if "aten_crash" in r]
        errors = [r["err_aten"] for r in aten if isinstance(r.get("err_aten"), float) and r["err_aten"] < float("inf")]
        largest = f", largest finite error {max(errors):.1e} of scale" if errors else ""
        print(
            f"  torch.export path ({len(aten)} models, {sum(r['bn_total'] for r in aten)} BN, "
            f"{sum(r['bn_left_aten'] for r in aten)} left{largest}): leaves more BN than the module path on "
            f"{worse or 'none'}; failed on {crashed or 'none'}"
        )

    failed = [
        r["model"]
        + "".join(f" [{p}: {r[f'diagnosis_verify_{p}']}]" for p in ("torch", "onnx") if r.get(f"diagnosis_verify_{p}"))
        for r in ran
        if r.get("verify_torch") is False or r.get("verify_onnx") is False
    ]
    print(f"  bnfold verify MISMATCH (torch or ONNX result): {failed or 'none'}")
    beyond = []  # ... and against the original's error when its weights move by half an ulp (float32 rounding)
    high = []  # each path against the original's own float32 error on the same runtime (PyTorch, ONNX Runtime)
    peers: dict[str, list[bool]] = {"fx fuse": [], "ORT basic": []}  # the peer on the same result: over 1.5x too?
    for r in ran:
        for path, err, own in (("torch", "err_torch", "err_own"), ("onnx", "err_onnx", "err_onnx_own")):
            if _num(r, own, 0.0) and _num(r, err, 0.0) > 1.5 * _num(r, own, 0.0):
                weights = f"; float32 weights alone {r['err_weights32']:.1e}" if "err_weights32" in r else ""
                noise = f"; half-ulp weight noise {r['err_halfulp']:.1e}" if r.get("err_halfulp") else ""
                peer_name, peer = _peer(r, path)
                if peer is not None:
                    peers[peer_name].append(peer > 1.5 * r[own])
                    noise += f"; {peer_name} {peer / r[own]:.2f}x"
                high.append(
                    f"{r['model']} {path} {r[err]:.1e} vs own {r[own]:.1e} ({r[err] / r[own]:.2f}x{weights}{noise})"
                )
                if _beyond(r, path):
                    said = r.get(f"diagnosis_{path}")
                    beyond.append(high[-1] + (f" [verify: {said}]" if said else ""))
    print(f"  max error over 1.5x the original's own float32 error ({DRAWS} inputs): {high or 'none'}")
    if any(peers.values()):
        said = ", ".join(f"{name} {sum(v)} of {len(v)}" for name, v in peers.items() if v)
        print(
            "  on those results, the peer on the same runtime (where measured and it folds as many BN) is over 1.5x "
            f"too: {said}"
        )
    sample = [r for r in ran if r.get("peer_sample")]
    if sample:
        rates = []
        for path, err, own in (("torch", "err_torch", "err_own"), ("onnx", "err_onnx", "err_onnx_own")):
            both = [r for r in sample if _num(r, own, 0.0) and isinstance(r.get(err), float) and _peer(r, path)[1]]
            mine = sum(1 for r in both if r[err] > 1.5 * r[own])
            theirs = sum(1 for r in both if _peer(r, path)[1] > 1.5 * r[own])
            rates.append(f"{path}: bnfold {mine} of {len(both)}, {_peer(sample[0], path)[0]} {theirs} of {len(both)}")
        print(
            f"  over 1.5x the original's own error on an unbiased sample ({len(sample)} models, --peer-every; "
            f"where the peer folds as many BN): {'; '.join(rates)}"
        )
    measured = sum(1 for r in ran if r.get("err_halfulp") is not None)
    print(
        f"  of those, also over 1.5x the original's error under half-ulp weight noise ({measured} models measured): "
        f"{beyond or 'none'}"
    )
    exact = [r["err_torch64"] for r in ran if isinstance(r.get("err_torch64"), float)]
    inexact = [
        f"{r['model']} ({r['err_torch64']:.1e}; own float32 error {_num(r, 'err_own'):.1e}"
        + (f"; float64 half-ulp weight noise {r['err_halfulp64']:.1e}" if r.get("err_halfulp64") is not None else "")
        + ")"
        for r in ran
        if isinstance(r.get("err_torch64"), float) and r["err_torch64"] > FOLD64_TOL
    ]
    if exact:
        print(
            f"  bnfold.fold in float64: largest error {max(exact):.1e} of scale over {len(exact)} models; "
            f"over 1e-9: {inexact or 'none'}"
        )
    times = sorted(r["fold_s"] for r in ran if "fold_s" in r)
    fuse = sorted(r["fuse_s"] for r in ran if "fuse_s" in r)
    if times:
        median = times[len(times) // 2]
        print(f"  fold seconds: bnfold.fold {sum(times):.1f} over {len(times)} (median {median:.2f})", end="")
        print(f", fx fuse {sum(fuse):.1f} over {len(fuse)} (median {fuse[len(fuse) // 2]:.2f})" if fuse else "")
    for path, key in (("PyTorch", "reasons_torch"), ("ONNX", "reasons_onnx")):
        print(f"reason classes, {path} path:")
        for name, count in Counter(c for r in ran for c in r.get(key, [])).most_common():
            print(f"  {count:>5}  {name}")


def _over(row: dict) -> bool:
    """Whether a bnfold path's error is over 1.5x the original's own float32 error."""
    pairs = (("err_torch", "err_own"), ("err_onnx", "err_onnx_own"))
    return any(_num(row, own, 0.0) and _num(row, err, 0.0) > 1.5 * _num(row, own, 0.0) for err, own in pairs)


def _rebuild(row: dict) -> tuple[nn.Module, torch.Tensor]:
    """A row's model and input as :func:`_measure` built them: the same random weights and statistics."""
    torch.manual_seed(0)
    model = build(row["model"]).eval()
    randomize_batchnorm(model)
    return model, torch.randn(row["input"], generator=torch.Generator().manual_seed(0))


def _add_noise(path: Path) -> None:
    """Add ``err_halfulp`` to the rows of ``path`` over 1.5x their own error (rebuilt as the sweep built them), and
    ``err_halfulp64`` to those whose float64 fold error is over ``FOLD64_TOL``."""

    def noise(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
        row["err_halfulp"] = _noise_error(spec, model, x)

    _fill_rows(
        path,
        lambda row: _over(row) and row.get("err_halfulp") is None,
        noise,
        lambda row: f"own {row.get('err_own', float('nan')):.1e}, half-ulp weight noise {row['err_halfulp']:.1e}",
    )
    _fill_rows(
        path,
        lambda row: _num(row, "err_torch64", 0.0) > FOLD64_TOL and row.get("err_halfulp64") is None,
        _noise_error64,
        lambda row: f"float64 fold {row['err_torch64']:.1e}, float64 half-ulp noise {row['err_halfulp64']:.1e}",
    )


def _onnx_verdict(model: nn.Module, kept: object, folded: object, x: torch.Tensor) -> str:
    """Where the folded ONNX file fails verify against the module: what verify says against the BN-keeping export.

    verify cannot localise between a module and an ONNX file; the export has the same value names as the fold, so
    it can there. Where the fold passes against the export, whether the export itself (no fold) passes against the
    module says if the difference is the exporter's and ONNX Runtime's, not the fold's.
    """
    said = _verdict(kept, folded, x)[1]
    if said:
        return said
    export_passes = bnfold.verify(model, kept, input_shapes=[tuple(x.shape)], power=False).passed
    return "passes on the export" + (
        "" if export_passes else "; the export itself (no fold) fails verify against the module too"
    )


def _reverify(spec: str, model: nn.Module, x: torch.Tensor, row: dict) -> None:
    """verify again on a row's folded ONNX result (a newer verify); what it says where it still fails."""
    kept = export_keeping_bn(model, (x,))
    folded_proto = bnfold.fold_onnx(kept)[0]
    row["verify_onnx"] = bnfold.verify(model, folded_proto, input_shapes=[tuple(x.shape)], power=False).passed
    row.pop("diagnosis_verify_onnx", None)
    # a detector's ONNX localisation holds every intermediate of the float64 evaluator (over 20 GB)
    if not row["verify_onnx"] and probe(spec, model) is model:
        row["diagnosis_verify_onnx"] = _onnx_verdict(model, kept, folded_proto, x)


def _reverify_onnx(path: Path) -> None:
    """Run verify again on the ONNX results of ``path`` that failed it (a newer verify), in place."""
    _fill_rows(
        path,
        lambda row: row.get("verify_onnx") is False,
        _reverify,
        lambda row: f"verify_onnx {row['verify_onnx']} {str(row.get('diagnosis_verify_onnx', ''))[:200]}",
        onnx_input=True,
    )


def _diagnose(path: Path, kinds: tuple[str, ...] = ("torch", "onnx")) -> None:
    """Add what verify says to the rows of ``path`` over both yardsticks or failing verify, for paths ``kinds``."""
    rows = json.loads(path.read_text())
    for row in rows:
        paths = [p for p in kinds if _beyond(row, p) and f"diagnosis_{p}" not in row]
        failed = [p for p in kinds if row.get(f"verify_{p}") is False and f"diagnosis_verify_{p}" not in row]
        if not paths and not failed:
            continue
        spec = row["model"]
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            model, x = _rebuild(row)
            if "torch" in paths or "torch" in failed:
                folded = bnfold.fold(model, (x,))[0]
                if "torch" in paths:
                    row["diagnosis_torch"] = diagnosis(model, folded, x)
                if "torch" in failed:
                    row["diagnosis_verify_torch"] = _verdict(model, folded, x)[1] or "passes now"
            if "onnx" in paths or "onnx" in failed:
                x = torch.randn(row.get("input_onnx", row["input"]), generator=torch.Generator().manual_seed(0))
                kept = export_keeping_bn(model, (x,))
                folded_proto = bnfold.fold_onnx(kept)[0]
                if "onnx" in paths:
                    row["diagnosis_onnx"] = diagnosis(kept, folded_proto, x)
                if "onnx" in failed:
                    row["diagnosis_verify_onnx"] = _onnx_verdict(model, kept, folded_proto, x)
        for key in [f"diagnosis_{p}" for p in paths] + [f"diagnosis_verify_{p}" for p in failed]:
            print(f"{spec} {key}: {row[key]}")
        _write_rows(path, rows)


def main() -> None:
    """Run the sweep, print rows and the reason classes, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="The fast subset (a dozen families).")
    parser.add_argument("--source", choices=["timm", "torchvision", "all"], default="all")
    parser.add_argument("--filter", default="", help="Regex on the model name.")
    parser.add_argument("--limit", type=int, default=0, help="At most this many architectures.")
    parser.add_argument("--every", type=int, default=1, help="Take every N-th architecture (a spread sample).")
    parser.add_argument("--offset", type=int, default=0, help="With --every: start at this one (0..N-1).")
    parser.add_argument("--interleave", type=int, default=0, help="Run in the order of every N-th, then the next.")
    parser.add_argument("--bn-only", action="store_true", help="Only architectures with a BN (checked on meta).")
    parser.add_argument("--models-from", help="Exactly the models of an earlier JSON (to rerun a sample).")
    parser.add_argument("--skip-from", nargs="+", default=[], help="Leave out the models of these JSON files.")
    parser.add_argument("--resume", action="store_true", help="Keep the rows already in --json, run the rest.")
    parser.add_argument("--summary-of", nargs="+", help="Print the summary of these JSON files together; run none.")
    parser.add_argument(
        "--add-noise",
        nargs="+",
        help="For rows of these JSON files over 1.5x their own error: add err_halfulp (the original under "
        "half-ulp weight noise); for rows whose float64 fold error is over 1e-9: add err_halfulp64 (the same in "
        "float64); in place; run nothing else.",
    )
    parser.add_argument(
        "--peer-errors",
        nargs="+",
        help="For rows of these JSON files over 1.5x their own error: add err_fuse and err_ort_basic (the peers' "
        "errors vs float64 on the same inputs) in place; run nothing else.",
    )
    parser.add_argument(
        "--peer-every",
        type=int,
        default=0,
        help="With --peer-errors: also every N-th row, as an unbiased sample for the rate of results over 1.5x.",
    )
    parser.add_argument(
        "--reverify-onnx",
        nargs="+",
        help="For rows of these JSON files whose ONNX result failed verify: run verify again (a newer verify), in "
        "place; run nothing else.",
    )
    parser.add_argument(
        "--aten",
        nargs="+",
        help="For rows of these JSON files without them: add the torch.export path's columns (bn_left_aten, "
        "err_aten, aten_s) in place; run nothing else.",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="Only BN total, BN left by bnfold.fold (in place) and fold seconds: for models too large for the "
        "full sweep's copies (run one per process: peak_rss_mb is the process's).",
    )
    parser.add_argument(
        "--onnx-dynamo",
        nargs="+",
        help="For rows of these JSON files without them: bnfold's ONNX pass on the dynamo exporter's file "
        "(optimizer off, BN kept): bn_left_onnx_dynamo, err_onnx_dynamo, in place; run nothing else.",
    )
    parser.add_argument(
        "--diagnose",
        nargs="+",
        help="For rows of these JSON files over 1.5x both their own and their half-ulp noise error: add what "
        "bnfold.verify says on the measured inputs (first divergence, ill-conditioning) in place; run nothing else.",
    )
    parser.add_argument(
        "--diagnose-paths",
        nargs="+",
        choices=["torch", "onnx"],
        default=["torch", "onnx"],
        help="With --diagnose: only these paths (ONNX localisation on a detector holds every intermediate of the "
        "float64 reference evaluator: over 20 GB here).",
    )
    parser.add_argument("--peers", choices=["basic", "all"], default="basic")
    parser.add_argument("--json", default=str(Path(__file__).with_name("real_zoo.json")))
    args = parser.parse_args()
    if args.add_noise or args.diagnose or args.aten or args.onnx_dynamo or args.peer_errors or args.reverify_onnx:
        for path in args.reverify_onnx or []:
            _reverify_onnx(Path(path))
        for path in args.peer_errors or []:
            _add_peer_errors(Path(path), args.peer_every)
        for path in args.aten or []:
            _fill(Path(path), "bn_left_aten", _aten)
        for path in args.onnx_dynamo or []:
            _fill(Path(path), "bn_left_onnx_dynamo", _onnx_dynamo)
        for path in args.add_noise or []:
            _add_noise(Path(path))
        for path in args.diagnose or []:
            _diagnose(Path(path), tuple(args.diagnose_paths))
        return
    if args.summary_of:
        rows = [row for path in args.summary_of for row in json.loads(Path(path).read_text())]
        summarize(list({row["model"]: row for row in rows}.values()))  # a model in two files: the later row
        return
    torch.set_num_threads(2)
    chosen = [s for s in specs(args.source) if re.search(args.filter, s)]
    if args.bn_only:
        chosen = [s for s in chosen if has_bn(s)]
    chosen = chosen[args.offset :: args.every]
    if args.interleave > 1:  # every N-th first, then the next N-th...: a stopped sweep is still a spread sample
        chosen = [s for k in range(args.interleave) for s in chosen[k :: args.interleave]]
    if args.models_from:
        wanted = _models_of([args.models_from])
        chosen = [s for s in specs(args.source) if s in wanted]
    if args.fast:
        chosen = FAST
    skip = _models_of(args.skip_from)
    chosen = [s for s in chosen if s not in skip]
    if args.limit:
        chosen = chosen[: args.limit]
    out = Path(args.json)
    rows = json.loads(out.read_text()) if args.resume and out.exists() else []
    # a model whose run was killed is tried once more (a sweep stopped by hand), then stays a crash row
    tries = {row["model"]: row["attempts"] for row in rows if row.get("attempts", 2) < 2}
    rows = [row for row in rows if row["model"] not in tries]
    done = {row["model"] for row in rows}
    print(
        f"{'model':<34} {'BN':>4} {'torch':>5} {'onnx':>4} {'ort':>4} {'fuse':>4} {'sim':>4} {'dyn':>4} "
        f"{'err torch':>9} {'err onnx':>9} {'own':>9} {'fold s':>6} {'fuse s':>6} {'err f64':>8}",
        flush=True,
    )
    for spec in chosen:
        if spec in done:
            continue
        # a placeholder first: a model that kills the process (memory) is a crash row when --resume goes on
        killed = "did not finish: the sweep's process was killed (memory?)"
        rows.append({"model": spec, "crash": killed, "attempts": tries.get(spec, 0) + 1})
        _write_rows(out, rows)
        try:
            row = sweep_one(spec, args.peers, lean=args.lean)
        except Exception as error:  # noqa: BLE001 - a crash is a result, counted
            row = {"model": spec, "crash": f"{type(error).__name__}: {str(error)[:200]}"}
            row["traceback"] = traceback.format_exc()[-2000:]
        rows[-1] = row
        _print_row(row)
        _write_rows(out, rows)
    summarize(rows)
    _write_rows(out, rows)


if __name__ == "__main__":
    main()
