"""GN+ReLU outputs rebuilt in the backward instead of kept (MODEL.GN.RECOMPUTE_OUTPUT): the same gradients,
bit for bit, while the outputs' memory is freed between forward and backward. Without a GPU the kernels run in
Triton's interpreter (see conftest)."""
import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torch.multiprocessing.reductions import StorageWeakRef

from gn_detection import triton_group_norm
from gn_detection.backbone import GNReLUBasicBlock, GNReLUBottleneckBlock, GNReLUStem
from gn_detection.box_head import GNConvFCHead
from gn_detection.group_norm import FusedGroupNorm, GroupNormSpec
from gn_detection.mask_head import GNMaskRCNNConvUpsampleHead
from gn_detection.recompute import active_registry, recomputed_outputs

from .conftest import SHAPES_CONFIG, make_cfg

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Each of our modules that runs convs after GN+ReLU layers: (constructor given a GN spec, input shape).
MODULES = {
    "stem": (lambda gn: GNReLUStem(3, 16, norm=gn), (2, 3, 20, 24)),
    "basic_block": (lambda gn: GNReLUBasicBlock(16, 32, stride=2, norm=gn), (2, 16, 10, 12)),
    "bottleneck_block": (lambda gn: GNReLUBottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm=gn),
                         (2, 16, 10, 12)),
    "box_head": (lambda gn: GNConvFCHead(ShapeSpec(channels=8, height=7, width=7), conv_dims=[8, 8], fc_dims=[16],
                                         gn=gn), (5, 8, 7, 7)),
    "mask_head": (lambda gn: GNMaskRCNNConvUpsampleHead(ShapeSpec(channels=8, height=6, width=6), num_classes=3,
                                                        conv_dims=[8, 8, 8], gn=gn).layers, (3, 8, 6, 6)),
}


@pytest.fixture(autouse=True)
def deterministic_convolutions():
    """Gradients are compared bit for bit: on a GPU, cuDNN must not pick a nondeterministic algorithm."""
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
        yield


def build(name, recompute):
    torch.manual_seed(0)
    make, shape = MODULES[name]
    module = make(GroupNormSpec(num_groups=4, impl="triton", recompute_output=recompute))
    owner = getattr(module, "__self__", module)  # the mask head's layers() is a bound method
    owner.to(DEVICE)
    with torch.no_grad():
        for m in owner.modules():
            if isinstance(m, FusedGroupNorm):  # away from the default 1 and 0, so a wrong parameter would show
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module, owner, torch.randn(shape, device=DEVICE, requires_grad=True)


def kept_outputs_and_gradients(module, owner, x):
    """For each GN+ReLU output of a forward, whether its memory is still held once the forward is done (only the
    graph holds it then); and the gradients of a fixed function of the module's output."""
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, y: outputs.append(StorageWeakRef(y.untyped_storage())))
             for m in owner.modules() if isinstance(m, FusedGroupNorm) and m.relu]
    y = module(x)
    for hook in hooks:
        hook.remove()
    gc.collect()  # Triton's interpreter leaves reference cycles that hold its launch arguments until collected
    kept = [not output.expired() for output in outputs]
    loss = (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum()
    return kept, torch.autograd.grad(loss, [x, *owner.parameters()])


@pytest.mark.parametrize("name", MODULES)
def test_outputs_are_freed_after_the_forward_and_gradients_stay_bit_identical(name):
    kept, grads = kept_outputs_and_gradients(*build(name, recompute=True))
    kept_without, grads_without = kept_outputs_and_gradients(*build(name, recompute=False))
    assert kept and not any(kept), kept
    assert all(kept_without), kept_without  # without recomputation the next op keeps every one
    for got, want in zip(grads, grads_without):
        assert torch.equal(got, want)


def test_under_autocast_the_half_precision_outputs_are_freed_too():
    dtype = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    results = []
    for recompute in (True, False):
        with torch.autocast(DEVICE, dtype=dtype):
            results.append(kept_outputs_and_gradients(*build("bottleneck_block", recompute)))
    (kept, grads), (kept_without, grads_without) = results
    assert kept and not any(kept) and all(kept_without)
    for got, want in zip(grads, grads_without):
        assert torch.equal(got, want)


def test_a_channels_last_block_rebuilds_its_outputs_in_their_layout():
    layouts, results = [], []
    for recompute in (True, False):
        module, owner, x = build("bottleneck_block", recompute)
        hooks = [m.register_forward_hook(lambda m, i, y: layouts.append(triton_group_norm._is_channels_last(y)))
                 for m in owner.modules() if isinstance(m, FusedGroupNorm)]
        results.append(kept_outputs_and_gradients(module, owner, x.detach().to(memory_format=torch.channels_last)
                                                  .requires_grad_()))
        for hook in hooks:
            hook.remove()
    (kept, grads), (kept_without, grads_without) = results
    assert layouts and all(layouts)  # every GN layer ran the kernels channels last
    assert kept and not any(kept) and all(kept_without)
    for got, want in zip(grads, grads_without):
        assert torch.equal(got, want)


def gn_relu_then_conv(x, layer, conv_weight):
    with recomputed_outputs():
        return F.conv2d(layer(x), conv_weight, padding=1)


def test_a_parameter_changed_in_place_before_the_backward_is_refused_with_the_key_to_set():
    layer = FusedGroupNorm(2, 4, relu=True, impl="triton").to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    y = gn_relu_then_conv(x, layer, torch.randn(3, 4, 3, 3, device=DEVICE))
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place.*MODEL.GN.RECOMPUTE_OUTPUT False"):
        y.sum().backward()


def test_an_output_changed_in_place_before_it_is_saved_is_kept_as_changed():
    weight = torch.randn(3, 4, 3, 3, device=DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    grads = []
    for context in (recomputed_outputs(), recomputed_outputs(enabled=False)):
        with context:
            y = triton_group_norm.group_norm(x, 2, relu=True, recompute=True)
            y.mul_(-1)  # a recipe would rebuild the values before this change
            out = F.conv2d(y, weight, padding=1)
        grads.append(torch.autograd.grad((out * out).sum(), x)[0])
    assert torch.equal(grads[0], grads[1])


def test_a_saved_view_with_an_offset_and_strides_is_rebuilt_as_that_view():
    x = torch.randn(2, 4, 5, 6, device=DEVICE, requires_grad=True)
    scale = torch.randn(3, 5, 3, device=DEVICE, requires_grad=True)
    grads = []
    for context in (recomputed_outputs(), recomputed_outputs(enabled=False)):
        with context:
            y = triton_group_norm.group_norm(x, 2, relu=True, recompute=True)
            view = y[1, 1:, :, ::2].transpose(0, 2)  # offset, reordered and skipped strides
            out = view * scale  # the multiply keeps the view for the gradient of scale
        grads.append(torch.autograd.grad((out * out).sum(), (x, scale)))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("relu", [True, False], ids=["gn_relu", "gn"])
def test_only_a_fused_relus_output_is_recomputed(relu):
    # Without the ReLU, GN's output is typically added to in place (a block's last GN) or kept by its caller:
    # a recipe would then only hold GN's input alive for longer.
    layer = FusedGroupNorm(2, 4, relu=relu, impl="triton").to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    factor = torch.ones(1, device=DEVICE, requires_grad=True)
    with recomputed_outputs():
        y = layer(x)
        output = StorageWeakRef(y.untyped_storage())
        product = y * factor  # the multiply keeps y for the gradient of factor
    del y
    gc.collect()
    assert output.expired() == relu
    (grad,) = torch.autograd.grad(product.sum(), factor)
    torch.testing.assert_close(grad, layer(x).sum().reshape(1))  # kept or rebuilt, y is y


def test_the_config_key_reaches_every_gn_layer():
    for value in (True, False):
        model = build_model(make_cfg(SHAPES_CONFIG, "MODEL.GN.RECOMPUTE_OUTPUT", value))
        layers = [m for m in model.modules() if isinstance(m, FusedGroupNorm)]
        assert layers and all(m.recompute_output == value for m in layers)


def saved_tensor_count(module, x):
    """How many tensors a caller's own saved-tensor hooks see saved during a forward."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        module(x)
    return len(seen)


def test_where_the_kernels_do_not_run_a_callers_saved_tensor_hooks_still_see_every_tensor():
    x = torch.randn(2, 16, 10, 12, device=DEVICE)
    counts = {}
    for recompute in (True, False):
        torch.manual_seed(0)
        gn = GroupNormSpec(num_groups=4, impl="torch", recompute_output=recompute)
        block = GNReLUBottleneckBlock(16, 32, bottleneck_channels=8, norm=gn).to(DEVICE)
        counts[recompute] = saved_tensor_count(block, x)
    assert counts[True] == counts[False] > 0


def gn_relu_output_is_kept(x):
    """Whether a GN+ReLU output made from ``x``, which a multiply keeps for its backward, still holds memory
    once only the autograd graph refers to it (it does unless a recipe was saved instead)."""
    y = triton_group_norm.group_norm(x, 2, relu=True, recompute=True)
    product = y * torch.ones(1, device=DEVICE, requires_grad=True)  # noqa: F841 (keeps the graph alive)
    output = StorageWeakRef(y.untyped_storage())
    del y
    gc.collect()
    return not output.expired()


def test_a_nested_context_shares_the_outer_registry_and_leaves_it_open():
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    with recomputed_outputs():
        outer = active_registry()
        with recomputed_outputs():
            assert active_registry() is outer
            assert not gn_relu_output_is_kept(x)
        assert active_registry() is outer  # closing the inner context did not close the outer one
        assert not gn_relu_output_is_kept(x)
    assert active_registry() is None
    assert gn_relu_output_is_kept(x)


def test_without_grad_mode_nothing_is_remembered():
    with recomputed_outputs():
        assert active_registry() is not None
        with torch.no_grad():
            assert active_registry() is None
        with torch.inference_mode():
            assert active_registry() is None


def test_a_context_is_per_thread():
    x = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    seen = {}

    def other_thread():
        seen["registry"] = active_registry()
        seen["kept"] = gn_relu_output_is_kept(x)

    with recomputed_outputs():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert not gn_relu_output_is_kept(x)  # this thread's outputs are recomputed
    assert seen == {"registry": None, "kept": True}
