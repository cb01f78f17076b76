"""The PyTorch fold pass: every pattern, each with the twin that must not fold."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent, bn_count, randomized
from torch import nn

import bnfold
from bnfold.errors import BnfoldError


def _fold(model, *inputs):
    model = randomized(model)
    folded, report = bnfold.fold(model, inputs or None)
    return model, folded, report


# -- into the preceding layer --------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_bn_folds_into_conv(dims, bias, groups):
    conv = getattr(nn, f"Conv{dims}d")(8, 8, 3, padding=1, bias=bias, groups=groups)
    bn = getattr(nn, f"BatchNorm{dims}d")(8)
    x = torch.randn(2, 8, *[5] * dims)
    model, folded, report = _fold(nn.Sequential(conv, bn), x)
    assert report.bn_folded == 1 and report.layers[0].action == "folded into preceding"
    assert report.layers[0].targets == ["0"] and bn_count(folded) == 0
    assert_equivalent(model, folded, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conv_transpose_with_groups_folds(dims, groups):
    convt = getattr(nn, f"ConvTranspose{dims}d")(8, 8, 2, stride=2, groups=groups)
    x = torch.randn(2, 8, *[3] * dims)
    model, folded, report = _fold(nn.Sequential(convt, getattr(nn, f"BatchNorm{dims}d")(8)), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_shared_producer_output_is_not_folded():
    x = torch.randn(2, 4, 6, 6)
    model, folded, report = _fold(Residual(), x)
    assert report.bn_kept == 1
    assert "also read by" in report.entry("bn").reason
    assert_equivalent(model, folded, x)


def test_linear_bn1d_folds_with_shapes_and_refuses_on_3d_input():
    x = torch.randn(4, 6)
    model, folded, report = _fold(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)
    # (N, C, L) input: BN normalises axis 1, Linear writes the last axis; C == L hides the mistake
    x3 = torch.randn(4, 5, 6)
    model, folded, report = _fold(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), x3)
    assert report.bn_kept == 1 and "axis 2" in report.layers[0].reason
    assert_equivalent(model, folded, x3)


def test_linear_bn1d_without_shapes_asks_for_example_inputs():
    _, _, report = _fold(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    assert report.bn_kept == 1 and "example_inputs" in report.layers[0].reason


def test_conv1d_bn1d_needs_shapes_but_conv2d_bn2d_does_not():
    _, _, report = _fold(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)))
    assert report.bn_kept == 1 and "example_inputs" in report.layers[0].reason
    _, _, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert report.bn_folded == 1


def test_unbatched_conv_is_not_folded_across_axes():
    # Conv1d on an unbatched (C, L) input puts channels on axis 0; BN1d on 2-D input normalises axis 1
    x = torch.randn(4, 4)
    model, folded, report = _fold(nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)), x)
    assert report.bn_kept == 1 and "axis 0" in report.layers[0].reason
    assert_equivalent(model, folded, x)


# -- into the following layer --------------------------------------------------------------


def test_bn_before_linear_folds_into_linear():
    x = torch.randn(4, 6)
    model, folded, report = _fold(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), x)
    assert report.layers[0].action == "folded into following" and report.layers[0].targets == ["1"]
    assert_equivalent(model, folded, x)


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_before_unpadded_conv_folds(groups):
    x = torch.randn(2, 4, 7, 7)
    model, folded, report = _fold(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=groups)), x)
    assert report.layers[0].action == "folded into following"
    assert_equivalent(model, folded, x)


def test_bn_before_zero_padded_conv_is_kept():
    x = torch.randn(2, 4, 7, 7)
    model, folded, report = _fold(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)), x)
    assert report.bn_kept == 1 and "zero-pads" in report.layers[0].reason
    assert_equivalent(model, folded, x)


def test_bn_before_reflect_padded_conv_folds():
    # reflect padding copies input values, so BN's shift reaches the borders too
    x = torch.randn(2, 4, 7, 7)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    model, folded, report = _fold(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), conv), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


def test_bn_chain_folds_to_fixpoint():
    x = torch.randn(4, 6)
    model, folded, report = _fold(nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm1d(6), nn.Linear(6, 3)), x)
    assert report.bn_folded == 2
    assert_equivalent(model, folded, x)


# -- concat --------------------------------------------------------------------------------


class Concat(nn.Module):
    def __init__(self, dim=1, reuse=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(6 if dim == 1 else 4)
        self.dim, self.reuse = dim, reuse

    def forward(self, x):
        a = self.a(x)
        b = self.b(x) if self.dim == 1 else self.a(x * 2)
        y = self.bn(torch.cat([a, b], dim=self.dim))
        return y + a.mean() if self.reuse else y


def test_bn_after_concat_folds_into_each_producer():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(Concat(), x)
    assert report.layers[0].action == "folded into producers" and report.layers[0].targets == ["a", "b"]
    assert_equivalent(model, folded, x)


def test_concat_negative_cases():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(Concat(reuse=True), x)
    assert report.bn_kept == 1 and "also read by" in report.layers[0].reason
    assert_equivalent(model, folded, x)
    model, folded, report = _fold(Concat(dim=2), x)
    assert report.bn_kept == 1
    assert_equivalent(model, folded, x)


# -- reuse, sharing, statistics ------------------------------------------------------------


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_reused_module_is_not_folded():
    x = torch.randn(2, 3, 4, 4)
    model, folded, report = _fold(Reused(), x)
    assert report.bn_kept == 1 and "called 2 times" in report.layers[0].reason
    assert_equivalent(model, folded, x)


def test_tied_weights_are_not_folded():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    x = torch.randn(3, 4)
    model, folded, report = _fold(nn.Sequential(a, nn.BatchNorm1d(4), b), x)
    assert report.bn_kept == 1 and "shared" in report.layers[0].reason
    assert_equivalent(model, folded, x)


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


def test_weight_read_outside_its_module_is_not_folded():
    x = torch.randn(2, 3, 4, 4)
    model, folded, report = _fold(ReadsWeight(), x)
    assert report.bn_kept == 1 and "outside the module" in report.layers[0].reason
    assert_equivalent(model, folded, x)


def test_no_running_stats_is_kept():
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    assert report.bn_kept == 1 and "no population statistics" in report.layers[0].reason


@pytest.mark.parametrize("affine", [True, False])
def test_eps_zero_affine_false_momentum_none(affine):
    x = torch.randn(2, 3, 5, 5)
    bn = nn.BatchNorm2d(4, eps=0.0, affine=affine, momentum=None)
    try:  # torch 2.11 refuses eps=0 even in eval mode; 2.13 only in training
        bn.eval()(torch.randn(2, 4, 3, 3))
    except ValueError:  # the model cannot run on this torch: refused in one line, naming torch's reason
        with pytest.raises(BnfoldError, match="rejected the example inputs: ValueError: batch_norm eps must be"):
            _fold(nn.Sequential(nn.Conv2d(3, 4, 3), bn), x)
        return
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), bn), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


def test_a_model_failing_on_the_example_inputs_is_refused_with_its_own_error(capfd):
    """Not fx's ShapeProp wrapper (a node dump) and not the traceback it prints: the model's error, one line."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(BnfoldError) as error:
        bnfold.fold(model, torch.randn(2, 2, 5, 5))  # 2 channels for a 3-channel conv
    message = str(error.value)
    assert message.startswith("the model rejected the example inputs: RuntimeError: ") and "channels" in message
    assert "ShapeProp" not in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err


def test_negative_variance_is_kept_with_reason():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model[1].running_var[2] = -1.0
    _, report = bnfold.fold(model)
    assert report.bn_kept == 1 and "negative" in report.layers[0].reason


def test_sync_batchnorm_folds():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


def test_hooked_layer_is_not_folded():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    _, report = bnfold.fold(model)
    assert report.bn_kept == 1 and "hooks" in report.layers[0].reason


# -- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float64_and_rounds_once(dtype):
    x = torch.randn(2, 3, 6, 6)
    model = randomized(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    ).to(dtype)
    folded, report = bnfold.fold(model, x.to(dtype))
    assert report.bn_folded == 2 and next(folded.parameters()).dtype == dtype
    assert_equivalent(model, folded, x)


def test_half_precision_overflow_is_refused():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).half()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[1].running_var.fill_(1e-4)
        model[1].weight.fill_(50.0)
        model[1].eps = 0.0
    folded, report = bnfold.fold(model)
    assert report.bn_kept == 1 and "overflows float16" in report.layers[0].reason
    assert torch.equal(folded[0].weight, model[0].weight)


# -- BN kinds ------------------------------------------------------------------------------


class BNReLU(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x))


def test_bn_subclass_with_activation_keeps_the_activation():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), BNReLU(4)), x)
    assert report.bn_folded == 1 and report.layers[0].kind == "BNReLU"
    assert not isinstance(folded[1], nn.BatchNorm2d)
    assert (folded(x) >= 0).all()
    assert_equivalent(model, folded, x)


def test_bn_subclass_with_activation_does_not_fold_into_following():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(nn.Tanh(), BNReLU(3), nn.Conv2d(3, 4, 1)), x)
    assert report.bn_kept == 1 and "applies more after BN" in report.layers[0].reason
    assert_equivalent(model, folded, x)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d, re-typed here so tests need no torchvision."""

    def __init__(self, n, eps=1e-5, wrong=False):
        super().__init__()
        self.eps, self.wrong = eps, wrong
        self.register_buffer("weight", torch.randn(n))
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        if self.wrong:
            scale = scale * 2
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def test_frozen_batchnorm_is_recognised_by_buffers():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), x)
    assert report.bn_folded == 1 and report.layers[0].kind == "FrozenBatchNorm2d"
    assert_equivalent(model, folded, x)


def test_module_with_bn_buffers_but_other_maths_is_kept():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, wrong=True)), x)
    assert report.bn_kept == 1 and "does not compute" in report.layers[0].reason
    assert_equivalent(model, folded, x)


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (as in timm): it would undo a folded scale."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True))
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_conv_with_custom_forward_is_not_a_target():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    assert report.bn_kept == 1 and "overrides forward" in report.layers[0].reason
    assert_equivalent(model, folded, x)


class Conv2dSame(nn.Conv2d):
    """TF-style "same" padding computed in forward (as timm's Conv2dSame): a plain conv on its output side."""

    def forward(self, x):
        pad_h = max((-(-x.shape[-2] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - x.shape[-1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_with_own_forward_that_scales_like_a_conv_takes_the_bn_after_it():
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    model, folded, report = _fold(model, x)
    assert report.bn_kept == 0 and report.layers[0].targets == ["0"], str(report)
    assert_equivalent(model, folded, x)


class ScriptableLinear(nn.Linear):
    """timm's ``Linear``: its own forward only adds a TorchScript path; a plain Linear on both sides."""

    def forward(self, x):
        if torch.jit.is_scripting():
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)


class ShiftedLinear(nn.Linear):
    """A forward that adds a constant to its input first: BN's shift must not move behind it."""

    def forward(self, x):
        return F.linear(x + 1.0, self.weight, self.bias)


@pytest.mark.parametrize(("head", "kept"), [(ScriptableLinear, 0), (ShiftedLinear, 1)], ids=["timm-linear", "twin"])
def test_bn_before_a_linear_with_own_forward(head, kept):
    """A Linear subclass proven in float64 to act like ``nn.Linear`` on its input takes the BN before it."""
    x = torch.randn(4, 6)
    model, folded, report = _fold(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), head(6, 3)), x)
    assert report.bn_kept == kept, str(report)
    if kept:
        assert "its own forward" in report.layers[0].reason, str(report)
    assert_equivalent(model, folded, x)


def test_bn_before_a_conv_with_own_forward_is_kept():
    """Its forward pads (or does anything) to its input: BN's shift must not move behind it."""
    x = torch.randn(2, 3, 6, 6)
    model, folded, report = _fold(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), Conv2dSame(3, 4, 3)), x)
    assert report.bn_kept == 1 and "its own forward" in report.layers[0].reason, str(report)
    assert_equivalent(model, folded, x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, None, False, 0.1, 1e-3)


def test_functional_batch_norm_with_constant_buffers_folds():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(Functional(), x)
    assert report.bn_folded == 1 and report.layers[0].kind == "F.batch_norm"
    assert isinstance(folded, torch.fx.GraphModule)
    assert "batch_norm" not in folded.code
    assert_equivalent(model, folded, x)


# -- tracing and its fallback --------------------------------------------------------------


class Untraceable(nn.Module):
    def __init__(self, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.residual = residual

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
            y = self.conv(x)
            out = self.bn(y)
            return out + y if self.residual else out
        return x


def test_untraceable_without_inputs_says_what_to_pass():
    with pytest.raises(BnfoldError, match="example_inputs"):
        bnfold.fold(Untraceable())


def test_untraceable_model_folds_from_a_recorded_run():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(Untraceable(), x)
    assert report.method == "recorded" and report.bn_folded == 1
    assert "branches" in report.notes[0]
    assert_equivalent(model, folded, x)


def test_recorded_run_sees_uses_outside_modules():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(Untraceable(residual=True), x)
    assert report.method == "recorded" and report.bn_kept == 1 and "also read by" in report.layers[0].reason
    assert_equivalent(model, folded, x)


class UntraceableHead(nn.Module):
    """timm's EfficientViT (MSRA) head, bn -> Dropout -> Linear, in a model fx cannot trace."""

    def __init__(self, always_drop: bool = False):
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(6), nn.Dropout(0.0), nn.Linear(6, 3)
        self.always_drop = always_drop

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: the fold works from a recorded run
            y = self.bn(x)
            y = nn.functional.dropout(y, 0.5, training=True) if self.always_drop else self.drop(y)
            return self.linear(y)
        return x


def test_recorded_run_folds_through_an_eval_dropout():
    x = torch.randn(4, 6)
    model, folded, report = _fold(UntraceableHead(), x)
    assert report.method == "recorded" and report.bn_folded == 1, report.layers[0].reason
    assert_equivalent(model, folded, x)


def test_recorded_run_keeps_bn_before_a_dropout_that_drops():
    x = torch.randn(4, 6)
    _, _, report = _fold(UntraceableHead(always_drop=True), x)  # training=True even in eval: random, not linear
    assert report.method == "recorded" and report.bn_kept == 1 and "dropout" in report.layers[0].reason


# -- whole-model properties ----------------------------------------------------------------


def test_original_untouched_result_eval_fold_twice_noop():
    x = torch.randn(2, 3, 6, 6)
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = bnfold.fold(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert not folded.training
    again, report2 = bnfold.fold(folded)
    assert report2.bn_total == 0
    assert torch.equal(again(x), folded(x))


def test_inplace_modifies_the_model():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    folded, _ = bnfold.fold(model, inplace=True)
    assert folded is model and isinstance(model[1], nn.Identity)


def test_model_without_bn_passes_unchanged():
    x = torch.randn(2, 5)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU())
    folded, report = bnfold.fold(model, x)
    assert report.bn_total == 0 and torch.equal(folded(x), model(x))


def test_dead_bn_is_reported():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(x)

    _, report = bnfold.fold(Dead())
    assert report.entry("unused").reason.startswith("not called by forward")


def test_report_dict_keys():
    _, _, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    d = report.to_dict()
    assert {"bn_total", "bn_folded", "bn_kept", "layers"} <= d.keys()
    assert {"name", "action", "targets", "reason"} <= d["layers"][0].keys()
    assert "1 folded" in str(report)


class TorchBatchNorm(nn.Module):
    """torch.batch_norm takes (input, weight, bias, mean, var, ...): not F.batch_norm's order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.randn(4))
        self.beta = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.batch_norm(self.conv(x), self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-3, False)


def test_torch_batch_norm_argument_order():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(TorchBatchNorm(), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


class KeywordBatchNorm(Functional):
    def forward(self, x):
        return F.batch_norm(
            input=self.conv(x),
            running_mean=self.mean,
            running_var=self.var,
            weight=self.gamma,
            training=False,
            eps=1e-3,
        )


def test_functional_batch_norm_called_with_keywords():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(KeywordBatchNorm(), x)
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: depthwise conv (groups == channels) and a residual around conv-BN pairs."""

    def __init__(self, c=4, e=3):
        super().__init__()
        h = c * e
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.body(x)


class DenseLayer(nn.Module):
    """DenseNet's pre-activation: BN -> ReLU -> Conv cannot fold; BN after a concat with the input -> 1x1 can."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(self.bn2(torch.cat([x, y], 1)))


def test_mobilenet_and_densenet_blocks():
    x = torch.randn(2, 4, 6, 6)
    model, folded, report = _fold(nn.Sequential(InvertedResidual(), InvertedResidual()), x)
    assert report.bn_folded == 6
    assert_equivalent(model, folded, x)
    model, folded, report = _fold(DenseLayer(), x)
    assert report.entry("bn2").action == "folded into following"
    assert report.entry("bn1").action == "kept" and "relu" in report.entry("bn1").reason
    assert_equivalent(model, folded, x)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_normalised_weights_are_not_targets(wrap):
    conv = nn.Conv2d(3, 4, 3)
    conv = nn.utils.parametrizations.weight_norm(conv) if wrap == "weight_norm" else nn.utils.spectral_norm(conv)
    x = torch.randn(2, 3, 6, 6)
    model, folded, report = _fold(nn.Sequential(conv, nn.BatchNorm2d(4)), x)
    assert report.bn_kept == 1 and "hooks or parametrizations" in report.layers[0].reason
    assert_equivalent(model, folded, x)


def test_instance_norm_is_not_a_batch_norm_and_channels_last_folds():
    x = torch.randn(2, 3, 6, 6)
    norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    _, _, report = _fold(nn.Sequential(nn.Conv2d(3, 4, 3), norm), x)
    assert report.bn_total == 0
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    model, folded, report = _fold(model, x.to(memory_format=torch.channels_last))
    assert report.bn_folded == 1
    assert_equivalent(model, folded, x)


class FlattenHead(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.bn, self.fc, self.how = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 9, 5), how
        self.flat = nn.Flatten()

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))
        if self.how == "module":
            y = self.flat(y)
        elif self.how == "function":
            y = torch.flatten(y, 1)
        elif self.how == "method":
            y = y.flatten(1)
        else:  # start_dim=2 keeps channels on axis 1: the Linear then reads spatial positions
            y = torch.flatten(y, 2).transpose(1, 2).reshape(y.shape[0], -1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["module", "function", "method"])
def test_bn_before_flatten_then_linear_folds(how):
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(FlattenHead(how), x)
    assert report.entry("bn").action == "folded into following" and report.entry("bn").targets == ["fc"]
    assert_equivalent(model, folded, x)


def test_bn_before_a_reordering_flatten_is_kept():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(FlattenHead("reorder"), x)
    assert report.entry("bn").action == "kept"
    assert_equivalent(model, folded, x)


class SumBN(nn.Module):
    def __init__(self, second="conv"):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1) if second == "conv" else nn.Identity()
        self.bn = nn.BatchNorm2d(4 if second == "conv" else 3)
        self.second = second

    def forward(self, x):
        if self.second == "conv":
            return self.bn(self.a(x) + self.b(x))
        return self.bn(x + self.b(x))  # one side is not a layer: not foldable


def test_bn_after_a_sum_of_two_convs_folds_into_both():
    x = torch.randn(2, 3, 5, 5)
    model, folded, report = _fold(SumBN(), x)
    assert report.layers[0].action == "folded into producers" and report.layers[0].targets == ["a", "b"]
    assert_equivalent(model, folded, x)
    model, folded, report = _fold(SumBN("identity"), x)
    assert report.bn_kept == 1
    assert_equivalent(model, folded, x)


class BroadcastSum(nn.Module):
    """(N, 4) + (N, 4, 2, 4): the Linear's features broadcast along the last (width) axis, not the channels."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv, self.bn = nn.Linear(3, 4), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x, v):
        return self.bn(self.fc(v) + self.conv(x))


def test_sum_that_broadcasts_across_axes_is_kept():
    x, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3)
    model = randomized(BroadcastSum())
    folded, report = bnfold.fold(model, (x, v))
    assert report.bn_kept == 1
    assert torch.allclose(folded(x, v), model(x, v), atol=1e-5)
    _, report = bnfold.fold(model)
    assert report.bn_kept == 1 and "example_inputs" in report.layers[0].reason


class _NormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, as written there: asserts on x.ndim, branches on training, then drop and act."""

    def __init__(self, c, act=True, drop=False):
        super().__init__(c)
        self.drop = nn.Dropout(0.1) if drop else nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class _DataAssertBN(nn.BatchNorm2d):
    """Asserts on the input's values: removing that check would change behaviour, so it must not fold."""

    def forward(self, x):
        torch._assert((x > -1e9).all(), "input out of range")
        return super().forward(x)


class _ShapeUsingBN(nn.BatchNorm2d):
    """Uses the input's shape in the computation, not only in a check."""

    def forward(self, x):
        return super().forward(x) * x.shape[1]


def test_norm_act_modules_fold_and_keep_their_activation():
    model = randomized(
        nn.Sequential(nn.Conv2d(3, 8, 3), _NormAct2d(8), nn.Conv2d(8, 8, 1), _NormAct2d(8, act=False, drop=True))
    )
    folded, report = bnfold.fold(model)
    assert report.bn_folded == 2, str(report)
    assert isinstance(folded[1], nn.Module) and any(isinstance(m, nn.SiLU) for m in folded[1].modules())
    assert_equivalent(model, folded, torch.randn(2, 3, 9, 9))


@pytest.mark.parametrize("cls", [_DataAssertBN, _ShapeUsingBN])
def test_bn_subclasses_that_read_the_input_beyond_its_rank_are_kept(cls):
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), cls(8)))
    folded, report = bnfold.fold(model)
    assert report.bn_folded == 0 and "custom forward" in report.layers[0].reason, str(report)
    assert_equivalent(model, folded, torch.randn(2, 3, 9, 9))


def test_two_bns_in_a_row_both_fold_into_the_conv():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()))
    folded, report = bnfold.fold(model)
    assert report.bn_folded == 2 and bn_count(folded) == 0, str(report)
    assert [e.targets for e in report.layers] == [["0"], ["0"]]
    assert_equivalent(model, folded, torch.randn(2, 3, 9, 9))


def test_bn_after_bn_after_a_shared_conv_is_kept():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn2(self.bn1(y)) + y

    model = randomized(Shared())
    folded, report = bnfold.fold(model)
    assert report.bn_folded == 0, str(report)
    assert_equivalent(model, folded, torch.randn(2, 3, 9, 9))


class _DeviceCache(nn.Module):
    """timm LeViT / EfficientFormer's pattern: in eval mode a tensor is cached under the input's device."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.cache: dict = {}

    def cached_bias(self, device):
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        return self.bn(self.conv(x)) + self.cached_bias(x.device)


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_leaves_no_proxy_in_a_models_cache(inplace):
    """Tracing fills the cache with a fx Proxy; a second trace then read a dead graph ("nonexistent value")."""
    model = randomized(_DeviceCache())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():  # an eager run first: a real tensor cached under "cpu" stays
        expected = model(x)
    folded, report = bnfold.fold(model, x, inplace=inplace)  # traces twice: without, then with the example input
    assert report.bn_folded == 1
    assert list(model.cache) == ["cpu"] and isinstance(model.cache["cpu"], torch.Tensor)
    assert list(folded.cache) == ["cpu"]
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
