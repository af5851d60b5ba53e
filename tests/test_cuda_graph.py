"""The backbone trained as CUDA graphs (MODEL.CUDA_GRAPHS): which calls are captured, replayed or run eagerly,
checked on the CPU with a capture that records its calls; and, on a GPU, real graphs that train a GN ResNet-FPN
exactly as the eager one does."""
import copy
import logging

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.backbone import FPN

from gn_detection.backbone import make_resnet, make_resnet_fpn
from gn_detection.cuda_graph import GraphedFPN, TrainingGraphs
from gn_detection.group_norm import GroupNormSpec

from .conftest import SHAPES_CONFIG, make_cfg

GN = GroupNormSpec(num_groups=8)


def tiny_fpn(freeze_at: int = 0, **kwargs) -> FPN:
    torch.manual_seed(0)
    return make_resnet_fpn(make_resnet(18, res2_out_channels=64, gn=GN, freeze_at=freeze_at),
                           in_features=["res2", "res3", "res4", "res5"], out_channels=32, gn=GN, **kwargs)


class RecordingCapture:
    """Stands in for CUDA graph capture on the CPU: records each capture (its sample, the parameters the graph
    would take as inputs, whether autocast's cast cache was off), replaces the captured module's forward as
    torch does, and returns a "graph" that counts its replays and runs that module's eager forward."""

    def __init__(self, error: Exception = None):
        self.samples, self.parameters, self.cache_enabled, self.replays, self.error = [], [], [], 0, error

    def __call__(self, module, sample):
        if self.error:
            raise self.error
        self.samples.append(sample)
        self.parameters.append(list(module.parameters()))
        self.cache_enabled.append(torch.is_autocast_cache_enabled())
        eager = module.forward

        def replay(x):
            self.replays += 1
            return eager(x)

        module.forward = replay
        return module


def recorded_fpn(max_graphs: int = 8, **capture_args):
    capture = RecordingCapture(**capture_args)
    fpn = tiny_fpn(cuda_graph_shapes=max_graphs)
    fpn.graphs = TrainingGraphs(max_graphs, capture=capture, device_type="cpu")
    return fpn, capture


def train_step(fpn, x, set_to_none=True):
    """A training step as Detectron2's trainer orders it: forward, zero the gradients, backward."""
    features = fpn(x)
    fpn.zero_grad(set_to_none=set_to_none)
    sum(f.sum() for f in features.values()).backward()


def test_one_capture_per_kind_of_input_then_replays_that_compute_the_eager_forward():
    fpn, capture = recorded_fpn()
    wide, tall = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 96, 64)
    outputs = fpn(wide)
    fpn(wide.clone())
    fpn(tall)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache on, as Detectron2's AMPTrainer leaves it
        fpn(wide)
    assert [tuple(s.shape) for s in capture.samples] == [(2, 3, 64, 96), (2, 3, 96, 64), (2, 3, 64, 96)]
    assert capture.cache_enabled[2] is False  # make_graphed_callables refuses autocast's cast cache
    assert capture.replays == 4 and len(fpn.graphs.graphs) == 3
    assert capture.samples[0] is not wide and torch.equal(capture.samples[0], wide)  # a copy the graph owns
    assert all(a is b for a, b in zip(capture.parameters[0], fpn.parameters()))  # the graph's inputs
    assert len(capture.parameters[0]) == len(list(fpn.parameters())) and "forward" not in vars(fpn)
    eager = FPN.forward(fpn, wide)
    assert outputs.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(outputs[name], eager[name], rtol=0, atol=0)


def test_eval_no_grad_and_shapes_beyond_the_limit_run_eagerly_with_one_warning(caplog):
    fpn, capture = recorded_fpn(max_graphs=1)
    x = torch.randn(1, 3, 64, 64)
    fpn.eval()
    fpn(x)
    fpn.train()
    with torch.no_grad():
        fpn(x)
    assert not capture.samples
    fpn(x)
    with caplog.at_level(logging.WARNING, logger="gn_detection.cuda_graph"):
        for size in (96, 128):
            assert fpn(torch.randn(1, 3, size, 64))["p2"].shape == (1, 32, size // 4, 16)
    assert len(capture.samples) == 1 and capture.replays == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "MODEL.CUDA_GRAPHS.MAX_SHAPES=1" in warnings[0]


@pytest.mark.parametrize("error", [RuntimeError("operation not permitted when stream is capturing"),
                                   torch.OutOfMemoryError("CUDA out of memory")])
def test_a_failed_capture_names_the_keys_to_change_keeps_the_error_type_and_is_not_kept(error):
    fpn, _ = recorded_fpn(error=error)
    with pytest.raises(type(error), match="MODEL.CUDA_GRAPHS.MAX_SHAPES.*MODEL.CUDA_GRAPHS.BACKBONE False") as raised:
        fpn(torch.randn(1, 3, 64, 64))
    assert raised.value.__cause__ is error and not fpn.graphs.graphs


def test_an_out_of_memory_error_seen_while_a_capture_ends_stays_one():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:  # torch.cuda.graph's exit ends the capture, which can fail in turn
            raise RuntimeError("capture_end failed")
    except RuntimeError as error:
        ending = error
    fpn, _ = recorded_fpn(error=ending)
    with pytest.raises(torch.OutOfMemoryError, match="lower MODEL.CUDA_GRAPHS.MAX_SHAPES"):
        fpn(torch.randn(1, 3, 64, 64))


def test_replays_train_like_detectron2_and_misuse_of_the_graph_memory_fails_loudly():
    fpn, capture = recorded_fpn()
    x = torch.randn(1, 3, 64, 64)
    for _ in range(3):
        train_step(fpn, x)
    assert len(capture.samples) == 1 and capture.replays == 3
    stale = fpn(x)  # a second forward of the shape before this one's backward overwrites its activations
    fpn(x)
    with pytest.raises(RuntimeError, match="before this call's backward"):
        stale["p2"].sum().backward()
    with pytest.raises(RuntimeError, match="set them to None before each backward"):
        train_step(fpn, x, set_to_none=False)  # gradients would be added to the graph's own buffers


@pytest.mark.parametrize("change", ["move", "replace", "unfreeze"])
def test_parameters_changed_after_a_capture_are_captured_again(change, caplog):
    fpn, capture = recorded_fpn()
    fpn.bottom_up.stem.conv1.weight.requires_grad_(False)
    x = torch.randn(1, 3, 64, 64)
    train_step(fpn, x)
    conv = fpn.fpn_output2
    if change == "move":  # as .to() does
        conv.weight.data = conv.weight.data.clone()
    elif change == "replace":  # as load_state_dict(assign=True) does
        conv.weight = torch.nn.Parameter(conv.weight.detach().clone())
    else:
        fpn.bottom_up.stem.conv1.weight.requires_grad_(True)
    with caplog.at_level(logging.INFO, logger="gn_detection.cuda_graph"):
        train_step(fpn, x)
        train_step(fpn, x)
    assert len(capture.samples) == 2 and "capturing them again" in caplog.text


def test_graphed_fpn_has_the_fpn_checkpoint_keys_and_copies_without_its_graphs():
    fpn, _ = recorded_fpn()
    fpn(torch.randn(1, 3, 64, 64))
    assert isinstance(fpn, GraphedFPN) and fpn.state_dict().keys() == tiny_fpn().state_dict().keys()
    copied = copy.deepcopy(fpn)
    assert not copied.graphs.graphs and copied.graphs.max_graphs == 8
    copied(torch.randn(1, 3, 64, 64))
    assert len(copied.graphs.graphs) == 1 and len(fpn.graphs.graphs) == 1  # the copy captures its own


def test_config_keys_choose_the_graphed_fpn_and_bad_values_name_the_key():
    on = build_model(make_cfg(SHAPES_CONFIG, "MODEL.CUDA_GRAPHS.BACKBONE", True, "MODEL.CUDA_GRAPHS.MAX_SHAPES", 3))
    assert isinstance(on.backbone, GraphedFPN) and on.backbone.graphs.max_graphs == 3
    assert type(build_model(make_cfg(SHAPES_CONFIG)).backbone) is FPN
    with pytest.raises(ValueError, match="MODEL.CUDA_GRAPHS.MAX_SHAPES must be >= 1, got 0"):
        build_model(make_cfg(SHAPES_CONFIG, "MODEL.CUDA_GRAPHS.BACKBONE", True, "MODEL.CUDA_GRAPHS.MAX_SHAPES", 0))
    with pytest.raises(ValueError, match="MODEL.CUDA_GRAPHS.BACKBONE needs MODEL.BACKBONE.NAME"):
        make_cfg(SHAPES_CONFIG, "MODEL.CUDA_GRAPHS.BACKBONE", True, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("freeze_at", [0, 2])
def test_cuda_graphs_train_like_the_eager_fpn(freeze_at):
    """SGD steps with momentum on two input shapes, the last two under AMP, so that each graph replays after
    optimizer steps (stale parameters or gradients would show): the graphed FPN's outputs, gradients and
    updated weights match the eager FPN's (same kernels, so to rounding at most); with FREEZE_AT 2 the stem
    and res2 stay frozen."""
    graphed = tiny_fpn(freeze_at, cuda_graph_shapes=3).cuda()
    eager = tiny_fpn(freeze_at).cuda()
    eager.load_state_dict(graphed.state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (graphed, eager)]
    torch.manual_seed(1)
    wide, tall = (2, 3, 96, 128), (2, 3, 128, 96)
    steps = [(wide, None), (wide, None), (tall, None), (wide, None), (wide, torch.float16), (wide, torch.float16)]
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
        for shape, amp in steps:
            x = torch.randn(shape, device="cuda")
            tolerance = {"rtol": 1e-2, "atol": 1e-2} if amp else {"rtol": 1e-5, "atol": 1e-5}
            results = []
            for model, optimizer in zip((graphed, eager), optimizers):
                with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                    features = model(x)
                    # a mean, not a sum: summed over every output, the gradients grew the weights to hundreds
                    # within four steps, and the first fp16 backward overflowed to inf in both models
                    loss = sum((f.float() * torch.linspace(-1, 1, f.numel(), device="cuda").view_as(f)).mean()
                               for f in features.values())
                optimizer.zero_grad()
                loss.backward()
                results.append(({k: v.detach().clone() for k, v in features.items()},
                                [p.grad.clone() for p in model.parameters() if p.requires_grad]))
                optimizer.step()
            (graphed_out, graphed_grads), (eager_out, eager_grads) = results
            assert len(graphed_grads) == len(eager_grads) > 0
            assert all(f.isfinite().all() for f in (*eager_out.values(), *eager_grads))  # the comparison's premise
            for name in eager_out:
                torch.testing.assert_close(graphed_out[name], eager_out[name], **tolerance)
            for mine, theirs in zip(graphed_grads, eager_grads):
                torch.testing.assert_close(mine, theirs, **tolerance)
    assert len(graphed.graphs.graphs) == 3  # two shapes, one of them also under AMP
    for mine, theirs in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_real_cuda_graphs_refuse_misuse_and_are_captured_again_for_new_parameters():
    fpn = tiny_fpn(cuda_graph_shapes=2).cuda()
    x = torch.randn(2, 3, 96, 128, device="cuda")
    train_step(fpn, x)
    stale = fpn(x)
    fpn(x)
    with pytest.raises(RuntimeError, match="before this call's backward"):
        stale["p2"].float().sum().backward()
    with pytest.raises(RuntimeError, match="set them to None before each backward"):
        train_step(fpn, x, set_to_none=False)
    fpn.fpn_output2.weight = torch.nn.Parameter(fpn.fpn_output2.weight.detach().clone())
    first = next(iter(fpn.graphs.graphs.values()))
    train_step(fpn, x)
    assert fpn.fpn_output2.weight.grad is not None and next(iter(fpn.graphs.graphs.values())) is not first
