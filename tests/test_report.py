"""Reason classes: every kept BN's reason falls in a class naming why no exact fold exists."""

from __future__ import annotations

import pytest

from bnfold.report import reason_class


@pytest.mark.parametrize(
    ("reason", "klass"),
    [
        (
            "before: stages.3.0.conv's parameters are shared with another module; after: its output is unused",
            "before: the layer's weight is shared or read elsewhere; after: model input or output",
        ),
        (
            "before: Relu 'r' is not a Conv, ConvTranspose, Gemm or MatMul; "
            "after: Add 'y' is not a Conv, ConvTranspose, Gemm or MatMul",
            "before: the neighbour is not a linear layer; after: the neighbour is not a linear layer",
        ),
        (
            "before: the output of Conv 'c' is also read by Add 'a'; after: Add 'y' is not MatMul plus a constant bias",
            "before: the value is also read elsewhere; after: a parameter is not a constant",
        ),
        ("not called by forward as a module of its own", "not run by forward (unused module, e.g. an aux head)"),
    ],
    ids=["shared-parameters", "onnx-sum", "matmul-with-computed-bias", "unused"],
)
def test_reason_class(reason, klass):
    assert reason_class(reason) == klass


def test_a_merge_reads_as_a_sum_with_its_subtracted_branches():
    from bnfold.report import SUBTRACTED, MergeEntry

    entry = MergeEntry("sub", ["mixer.conv", "mixer.identity", f"norm.identity {SUBTRACTED}"], "mixer.conv")
    assert entry.expression == "mixer.conv + mixer.identity - norm.identity"
    assert MergeEntry("sub", [f"a {SUBTRACTED}", "b"], "b").expression == "-a + b"
