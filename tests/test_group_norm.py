import numpy as np
import pytest
import torch

from gn_detection.group_norm import GroupNormChannelsError, GroupNormSpec, resolve_norm


def reference_group_norm(x, num_groups, weight, bias, eps):
    """GN computed by hand in float64: normalize each (sample, group) over its channels and pixels."""
    x = x.double()
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = grouped.var(dim=2, unbiased=False, keepdim=True)
    normalized = ((grouped - mean) / torch.sqrt(var + eps)).reshape_as(x)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return normalized * weight.double().reshape(shape) + bias.double().reshape(shape)


@pytest.mark.parametrize(
    "spec, channels, expected_groups",
    [
        (GroupNormSpec(num_groups=32), 64, 32),
        (GroupNormSpec(num_groups=1), 48, 1),  # LayerNorm-like
        (GroupNormSpec(num_groups=4, eps=1e-3), 12, 4),
        (GroupNormSpec(channels_per_group=1), 16, 16),  # InstanceNorm-like
        (GroupNormSpec(channels_per_group=16), 64, 4),
    ],
)
def test_layer_matches_float64_reference(spec, channels, expected_groups):
    torch.manual_seed(0)
    layer = spec(channels)
    assert layer.num_groups == expected_groups and layer.eps == spec.eps
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, channels, 7, 5) * 3 + 1).requires_grad_()
    out = layer(x)
    expected = reference_group_norm(x, expected_groups, layer.weight, layer.bias, spec.eps)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # gradients too: against autograd through the float64 reference
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad.double())  # float32, like x
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_statistics_do_not_depend_on_the_batch():
    layer = GroupNormSpec(num_groups=8)(32)
    x = torch.randn(4, 32, 6, 6)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))


@pytest.mark.parametrize(
    "spec, channels, setting",
    [
        (GroupNormSpec(num_groups=32), 48, "MODEL.GN.NUM_GROUPS=32"),
        (GroupNormSpec(num_groups=32), 16, "MODEL.GN.NUM_GROUPS=32"),
        (GroupNormSpec(channels_per_group=5), 64, "MODEL.GN.CHANNELS_PER_GROUP=5"),
    ],
)
def test_indivisible_channels_error_names_channels_and_setting(spec, channels, setting):
    with pytest.raises(GroupNormChannelsError) as e:
        spec(channels)
    assert setting in str(e.value) and f"{channels} channels" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, key", [({"num_groups": 0}, "NUM_GROUPS"), ({"channels_per_group": -1}, "CHANNELS_PER_GROUP"),
                    ({"eps": 0.0}, "EPS"), ({"num_groups": 16.0}, "NUM_GROUPS must be an integer >= 1, got 16.0"),
                    ({"num_groups": "32"}, "NUM_GROUPS must be an integer >= 1, got '32'"),
                    ({"channels_per_group": True}, "CHANNELS_PER_GROUP must be an integer"), ({"eps": "1e-5"}, "EPS"),
                    ({"eps": float("inf")}, "EPS must be a finite number > 0, got inf"), ({"eps": True}, "EPS"),
                    ({"fuse_relu": "no"}, "FUSE_RELU must be True or False, got 'no'"),
                    ({"recompute_output": 1}, "RECOMPUTE_OUTPUT must be True or False, got 1")]
)
def test_invalid_settings_are_rejected_with_their_key(kwargs, key):
    with pytest.raises(ValueError, match=f"MODEL.GN.{key}"):
        GroupNormSpec(**kwargs)


def test_numpy_numbers_are_settings_like_any_other():
    assert GroupNormSpec(num_groups=np.int64(8), eps=np.float32(1e-3))(16).num_groups == 8


def test_resolve_norm_only_replaces_gn():
    spec = GroupNormSpec(num_groups=4)
    assert resolve_norm("GN", spec) is spec
    for other in ("FrozenBN", "SyncBN", "BN", ""):
        assert resolve_norm(other, spec) == other
