"""Running ONNX models: ONNX Runtime without its own graph optimisations, and a float64 reference."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError, first_line
from bnfold.onnx_fold.files import session_source
from bnfold.onnx_fold.tensors import decode

__all__ = ["as_float64", "ort_message", "reference_float64", "run_ort"]

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _retype(graph: onnx.GraphProto) -> None:
    for init in graph.initializer:
        if init.data_type in _FLOATS:
            init.CopyFrom(numpy_helper.from_array(decode(init).astype(np.float64), init.name))
    for info in list(graph.input) + list(graph.output):
        if info.type.tensor_type.elem_type in _FLOATS:
            info.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _FLOATS:
                attr.t.CopyFrom(numpy_helper.from_array(decode(attr.t).astype(np.float64), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in _FLOATS:
                attr.i = onnx.TensorProto.DOUBLE
            elif attr.type == onnx.AttributeProto.GRAPH:
                _retype(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _retype(sub)


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 (float inputs, weights, constants and casts)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _retype(copy.graph)
    return copy


def _inference_batch_norm() -> type:
    """BatchNormalization for the reference evaluator at every opset (its own BN-6/7 returns a malformed result)."""
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, **_ignored):  # noqa: ANN001, ANN003, ANN202
            eps = 1e-5 if epsilon is None else epsilon
            shape = [1, -1] + [1] * (x.ndim - 2)
            y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape)
            return ((y + bias.reshape(shape)).astype(x.dtype),)

    return BatchNormalization


def _conv_transpose() -> type:
    """ConvTranspose for the reference evaluator, via torch in float64 (its own mishandles groups)."""
    from onnx.reference.op_run import OpRun

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(  # noqa: ANN202, PLR0913
            self,
            x,  # noqa: ANN001
            w,  # noqa: ANN001
            b=None,  # noqa: ANN001
            auto_pad=None,  # noqa: ANN001
            dilations=None,  # noqa: ANN001
            group=None,  # noqa: ANN001
            kernel_shape=None,  # noqa: ANN001
            output_padding=None,  # noqa: ANN001
            output_shape=None,  # noqa: ANN001
            pads=None,  # noqa: ANN001
            strides=None,  # noqa: ANN001
        ):
            import torch
            import torch.nn.functional as F

            spatial = x.ndim - 2
            strides = list(strides or [1] * spatial)
            dilations = list(dilations or [1] * spatial)
            output_padding = list(output_padding or [0] * spatial)
            kernel = list(w.shape[2:])
            full = [
                s * (n - 1) + op + (k - 1) * d + 1
                for s, n, op, k, d in zip(strides, x.shape[2:], output_padding, kernel, dilations, strict=True)
            ]
            mode = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
            if output_shape is not None or mode in ("SAME_UPPER", "SAME_LOWER"):
                target = (
                    list(output_shape)
                    if output_shape is not None
                    else [n * s for n, s in zip(x.shape[2:], strides, strict=True)]
                )
                total = [f - t for f, t in zip(full, target, strict=True)]
                if mode == "SAME_UPPER":
                    begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
                else:
                    begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
            else:
                pads = list(pads or [0] * 2 * spatial)
                begin, end = pads[:spatial], pads[spatial:]
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
            y = conv(
                torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w)), None, strides, 0, 0, group or 1, dilations
            )
            tail = [p for i in reversed(range(spatial)) for p in (0, output_padding[i])]
            y = F.pad(y, tail)
            index = [slice(None), slice(None)] + [
                slice(bg, y.shape[2 + i] - en) for i, (bg, en) in enumerate(zip(begin, end, strict=True))
            ]
            y = y[tuple(index)]
            if b is not None:
                y = y + torch.from_numpy(np.array(b)).reshape([1, -1] + [1] * spatial)
            return (y.numpy().astype(x.dtype),)

    return ConvTranspose


def reference_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The truth: ``model`` evaluated in float64 by the ONNX reference evaluator (inference-mode BN)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(as_float64(model), new_ops=[_inference_batch_norm(), _conv_transpose()])
    cast = {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}
    try:
        return [np.asarray(o) for o in evaluator.run(None, cast)]
    except (RuntimeError, ValueError, TypeError, NotImplementedError, KeyError) as error:
        first = first_line(error)
        raise BnfoldError(
            f"the ONNX reference evaluator cannot run the model in float64 ({type(error).__name__}: {first})"
        ) from None


def run_ort(
    model: onnx.ModelProto | str,
    feeds: dict[str, np.ndarray],
    *,
    optimize: bool = False,
    providers: list[str] | None = None,
) -> list[np.ndarray]:
    """Run ``model`` in ONNX Runtime; graph optimisations stay off unless ``optimize`` (ORT folds BN itself)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    source = model if isinstance(model, str) else session_source(model)
    with ort_errors():
        session = ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
        return [np.asarray(o) for o in session.run(None, feeds)]


@contextlib.contextmanager
def ort_errors() -> Iterator[None]:
    """ONNX Runtime refusing a model or its inputs is a one-line :class:`BnfoldError`, not a crash."""
    try:
        yield
    except Exception as error:
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        message = ort_message(first_line(error, 2000))
        if "Unsupported model IR version" in message:
            message += "; this onnxruntime is older than the file's format: upgrade onnxruntime"
        raise BnfoldError(f"ONNX Runtime cannot run the model ({message[:300]})") from None


_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"/\S*onnxruntime_src/\S+:\d+ ")


def ort_message(text: str) -> str:
    """ONNX Runtime's error text without its status prefix and the C++ source line and signature it quotes.

    ``[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/.../model.cc:202
    onnxruntime::Model::Model(onnx::ModelProto&&, ...) Unsupported model IR version: 14, max supported IR
    version: 13`` becomes ``Load model from m.onnx failed: Unsupported model IR version: 14, max supported IR
    version: 13``: what the user needs, inside the length an error line allows.
    """
    text = _ORT_STATUS.sub("", text.strip())
    source = _ORT_SOURCE.search(text)
    if source is None:
        return text
    rest = text[source.end() :]
    opening = rest.find("(")
    if opening < 0 or "::" not in rest[:opening]:  # no C++ signature after the source line
        return f"{text[: source.start()].rstrip()} {rest}".strip()
    depth, end = 0, opening
    while end < len(rest):  # to the parenthesis closing the signature's argument list
        depth += (rest[end] == "(") - (rest[end] == ")")
        if depth == 0:
            break
        end += 1
    rest = re.sub(r"^\s*const\b", "", rest[end + 1 :]).strip()
    return f"{text[: source.start()].rstrip()} {rest}".strip()
