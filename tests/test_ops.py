"""The fused head as a registered PyTorch operator (simplenet_fast/ops.py): opcheck, the fake
implementation, torch.compile without graph breaks, torch.export round trips, and bad inputs
refused alike in eager, compiled and exported code. CPU and CUDA share the test bodies."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from conftest import DEVICES, TinyBackbone, random_backbone, random_features, randomize_head, relative_error
from simplenet_fast import SimpleNet, SimpleNetHead, _fused, anomaly_map, build_info
from simplenet_fast.scoring import ScoringModule, export_program

FLOAT32_TOL = 1e-4  # SPEC 6
OP = torch.ops.simplenet_fast.patch_scores

pytestmark = pytest.mark.skipif(not build_info()["compiled"], reason="simplenet_fast._C is not built")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would make 'float32' GEMMs and convolutions on the GPU 10-bit: the contract is true
    float32 (eager and compiled code would round differently)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def op_arguments(head: SimpleNetHead, features, *rest):
    disc = head.discriminator
    return (*features, *head.operator_weights(), head.pretrain_embed_dim, disc.bn.eps,
            disc.negative_slope, *rest)


def odd_case(generator, batch: int, device="cpu"):
    """A 35x37 layer2 grid (18x19 layer3), odd target dim: one window straddles both layers."""
    head = randomize_head(SimpleNetHead((24, 40), 100, 71, 48), generator).to(device)
    head.requires_grad_(False)  # opcheck's autograd tests would differentiate the weights
    return head, random_features(head.channels, batch, (35, 37), (18, 19), generator, device)


class UserModel(nn.Module):
    """A user's own module: their backbone, our head with its default arguments, our map."""

    def __init__(self, head: SimpleNetHead):
        super().__init__()
        self.backbone = TinyBackbone()
        self.head = head

    def forward(self, images):
        scores = self.head.patch_scores(self.backbone(images))
        return scores.amax(dim=(1, 2)), anomaly_map(scores, images.shape[-2:])


def user_model(generator) -> UserModel:
    torch.manual_seed(0)
    return UserModel(randomize_head(SimpleNetHead(TinyBackbone.channels, 30, 23, 20), generator)).eval()


# ---------------------------------------------------------------------------------- the operator
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_opcheck_passes(device, batch, generator):
    head, features = odd_case(generator, batch, device)
    compute = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in compute:
        for check_finite in (True, False):
            result = torch.library.opcheck(OP, op_arguments(head, features, dtype, check_finite))
            assert set(result.values()) == {"SUCCESS"}, result
    scores = torch.randn(batch, 35, 37, device=device)
    assert set(torch.library.opcheck(torch.ops.simplenet_fast.check_finite_scores,
                                     (scores, *features)).values()) == {"SUCCESS"}
    assert set(torch.library.opcheck(torch.ops.simplenet_fast.anomaly_map,
                                     (scores, 70, 41, 4.0)).values()) == {"SUCCESS"}


@pytest.mark.parametrize("device", DEVICES)
def test_operator_matches_the_reference(device, generator):
    head, features = odd_case(generator, 3, device)
    with torch.no_grad():
        expected = head.reference_patch_scores(features)
    actual = OP(*op_arguments(head, features))
    assert actual.shape == (3, 35, 37) and actual.dtype == torch.float32
    assert relative_error(actual, expected) < FLOAT32_TOL


def test_fake_implementation_gives_shapes_without_running(generator, monkeypatch):
    head, features = odd_case(generator, 3)
    monkeypatch.setattr(_fused, "run", lambda *a, **k: pytest.fail("the kernel ran"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in op_arguments(head, features)[:11]]
        out = OP(*fake, head.pretrain_embed_dim, 1e-5, 0.2)
        amap = torch.ops.simplenet_fast.anomaly_map(out, 60, 50, 4.0)
    assert out.shape == (3, 35, 37) and out.dtype == torch.float32
    assert amap.shape == (3, 60, 50)


def test_operator_follows_weight_updates(generator):
    """The fold is cached inside the kernel per weight state: every in-place change shows."""
    head, features = odd_case(generator, 1)
    first = OP(*op_arguments(head, features))
    with torch.no_grad():
        head.discriminator.bn.running_var.mul_(3.0)    # a buffer
        head.adaptor.weight.add_(0.05)                 # a parameter
        expected = head.reference_patch_scores(features)
    second = OP(*op_arguments(head, features))
    assert not torch.equal(first, second)
    assert relative_error(second, expected) < FLOAT32_TOL
    fresh = randomize_head(SimpleNetHead((24, 40), 100, 71, 48), generator)
    head.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        expected = fresh.reference_patch_scores(features)
    assert relative_error(OP(*op_arguments(head, features)), expected) < FLOAT32_TOL


def test_fold_packing_and_pooling_tables_are_built_once_per_weight_state(generator, monkeypatch):
    head, features = odd_case(generator, 1)
    built = {"fold": 0, "pack": 0, "tables": 0}
    for name, key in (("fold_weights", "fold"), ("_pack", "pack"), ("_pool_tables", "tables")):
        original = getattr(_fused, name)
        monkeypatch.setattr(_fused, name, lambda *a, _f=original, _k=key, **k: (
            built.__setitem__(_k, built[_k] + 1), _f(*a, **k))[1])
    for _ in range(3):
        OP(*op_arguments(head, features))
    assert built == {"fold": 1, "pack": 2, "tables": 2}  # weight2 and weight3; layer2 and layer3
    OP(*op_arguments(head, [f[..., :-1] for f in features]))  # another grid: its tables only
    assert built == {"fold": 1, "pack": 2, "tables": 4}
    with torch.no_grad():
        head.discriminator.linear.bias.add_(1.0)
    OP(*op_arguments(head, features))
    assert built == {"fold": 2, "pack": 4, "tables": 6}


def test_cache_neither_keeps_weights_alive_nor_mixes_up_their_successors(generator):
    """Heads created and dropped in turn (their memory reused at once, versions alike) each get
    their own fold; the cache holds no reference that keeps a dropped head's weights alive."""
    features = random_features((24, 40), 1, (35, 37), (18, 19), generator)
    for _ in range(4):
        head = randomize_head(SimpleNetHead((24, 40), 100, 71, 48), generator)
        with torch.no_grad():
            expected = head.reference_patch_scores(features)
            assert relative_error(head.patch_scores(features, fused=True), expected) < FLOAT32_TOL
        alive = weakref.ref(head.adaptor.weight)
        del head
        gc.collect()
        assert alive() is None


def test_weights_never_receive_gradients(generator):
    head, features = odd_case(generator, 1)
    head.requires_grad_(True)
    scores = OP(*op_arguments(head, features))
    with pytest.raises(ValueError, match="inference-only"):
        scores.sum().backward()


def test_anomaly_map_operator_is_differentiable(generator):
    """The map is linear in the scores: its gradient is the transposed operators' product."""
    scores = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: anomaly_map(s, (11, 13), 1.5), (scores,))


# ---------------------------------------------------------------------------------- bad inputs
BAD_FEATURES = {
    # name: (mutation of [layer2, layer3], message)
    "channels": (lambda f: [f[0][:, :5], f[1]], r"layer2 features must be \[B, 24, H, W\]"),
    "dtype": (lambda f: [f[0].double(), f[1].double()], "no kernel for cpu torch.float64"),
    "nan": (lambda f: [f[0].index_fill(3, torch.tensor([4]), float("nan")), f[1]], "NaN or Inf"),
    "grad": (lambda f: [f[0].clone().requires_grad_(True), f[1]], "inference-only"),
}


def fused_scores(head):
    return lambda f2, f3: head.patch_scores([f2, f3], fused=True)


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_bad_features_raise_alike_in_eager_and_compiled_code(case, generator):
    """Dynamo traces the checks (fullgraph=False: the ValueError itself; the NaN check runs in
    the kernel, so a fullgraph-compiled function raises it too)."""
    head, features = odd_case(generator, 1)
    mutate, message = BAD_FEATURES[case]
    with pytest.raises(ValueError, match=message):
        fused_scores(head)(*mutate(features))
    torch._dynamo.reset()
    compiled = torch.compile(fused_scores(head), backend="eager")
    with pytest.raises(ValueError, match=message):
        compiled(*mutate(features))
    assert torch.is_grad_enabled()  # an error inside the compiled code left no global state


@pytest.fixture(scope="module")
def compiled_user_model():
    """One fullgraph compile shared by the tests below (compiling costs ~20 s on 2 cores)."""
    model = user_model(torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    return model, torch.compile(model, fullgraph=True)


@pytest.mark.slow
def test_user_module_compiles_fullgraph_and_matches_eager(compiled_user_model, generator):
    model, compiled = compiled_user_model
    images = torch.rand(3, 3, 40, 56, generator=generator)
    with torch.no_grad():
        expected = model(images)
        actual = compiled(images)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < FLOAT32_TOL


@pytest.mark.slow
def test_nan_is_refused_by_fullgraph_compiled_and_exported_code(compiled_user_model, generator,
                                                                tmp_path):
    model, compiled = compiled_user_model
    images = torch.rand(3, 3, 40, 56, generator=generator)
    with torch.no_grad():
        model.backbone.a.bias[0] = float("nan")  # NaN features from finite images
        try:
            with pytest.raises(ValueError, match="features contain NaN or Inf"):
                compiled(images)
        finally:
            model.backbone.a.bias[0] = 0.0
        program = torch.export.export(model, (images,))
        torch.export.save(program, tmp_path / "user.pt2")
        loaded = torch.export.load(tmp_path / "user.pt2").module()
        loaded.get_parameter("backbone.a.bias").data[0] = float("nan")
        with pytest.raises(ValueError, match="features contain NaN or Inf"):
            loaded(images)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("case", ["channels", "dtype", "grad"])
def test_bad_features_are_refused_when_exporting(case, generator):
    head, features = odd_case(generator, 1)
    mutate, message = BAD_FEATURES[case]

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, f2, f3):
            return self.head.patch_scores([f2, f3], fused=True)

    with pytest.raises(ValueError, match=message):
        torch.export.export(Head(), tuple(mutate(features)))


@pytest.mark.parametrize("mutation,message", [
    (lambda a: (*a[:2], a[2][:, :-1], *a[3:]), r"adaptor_weight must be \[71, 71\]"),
    (lambda a: (*a[:10], a[10].T, *a[11:]), r"tail_weight must be \[1, 48\]"),
    (lambda a: (*a[:11], 0, *a[12:]), "pretrain_embed_dim must be a positive int"),
    (lambda a: (*a[:12], -1.0, *a[13:]), "bn_eps must be a finite number >= 0"),
    (lambda a: (*a, torch.bfloat16), r"compute_dtype must be one of \(torch.float32,\) on cpu"),
    (lambda a: (a[0].to(torch.int32), a[1].to(torch.int32), *a[2:]), "floating point"),
])
def test_operator_refuses_bad_arguments_with_clear_errors(mutation, message, generator):
    head, features = odd_case(generator, 1)
    arguments = mutation(op_arguments(head, features))
    with pytest.raises(ValueError, match=message):
        OP(*arguments)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=message):
        OP(*arguments)  # the fake implementation refuses alike


# ---------------------------------------------------------------------------------- compile / export
@pytest.mark.parametrize("backbone", ["wide_resnet50_2", "efficientnet_lite0"])
def test_model_device_path_traces_without_graph_breaks(backbone):
    """Dynamo alone (backend="eager", no inductor): the whole path of both backbones, the fused
    head with its in-kernel finiteness check and the map are one graph."""
    torch.manual_seed(0)
    model = SimpleNet(random_backbone(backbone), image_size=64, resize=64, pretrain_embed_dim=48,
                      target_embed_dim=41, hidden=24)
    crops = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ScoringModule(model))(crops)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes}
    assert {"simplenet_fast.patch_scores.default", "simplenet_fast.anomaly_map.default"} <= ops, ops


@pytest.mark.slow
def test_compile_and_scoring_module_on_rectangular_padded_inputs(generator):
    """A "pad" model on a non-square grid: the compiled path and ScoringModule (with each
    input's real size) give what the eager `score` / `forward` give."""
    torch.manual_seed(0)
    model = SimpleNet(TinyBackbone(), image_size=(40, 56), resize_mode="pad", pretrain_embed_dim=30,
                      target_embed_dim=23, hidden=20)
    randomize_head(model.head, generator)
    images = [torch.rand(3, h, w, generator=generator) for h, w in ((50, 47), (20, 90), (40, 56))]
    expected = model.score(images, batch_size=3)
    torch._dynamo.reset()
    actual = model.score(images, batch_size=3, compile=True)
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        assert relative_error(getattr(actual, name), getattr(expected, name)) < FLOAT32_TOL
    inputs = torch.stack([model.prepare(image).input for image in images])
    real = torch.tensor([list(model.prepare(image).placement.real) for image in images])
    direct = model(inputs, real_size=real)
    pred_score, amap, scores = ScoringModule(model)(inputs, real)
    assert relative_error(pred_score, direct.pred_score) < FLOAT32_TOL
    assert relative_error(amap, direct.anomaly_map) < FLOAT32_TOL
    assert relative_error(scores, direct.patch_scores) < FLOAT32_TOL
    with pytest.raises(ValueError, match=r"uint8 input must be torch.uint8 \[B, 40, 56, 3\]"):
        ScoringModule(model)(inputs.transpose(1, 2))


@pytest.mark.slow
def test_exported_program_contains_the_operator_and_round_trips(generator, tmp_path):
    torch.manual_seed(0)
    model = SimpleNet(TinyBackbone(), image_size=48, resize=48, pretrain_embed_dim=30,
                      target_embed_dim=23, hidden=20)
    randomize_head(model.head, generator)
    program = export_program(model)  # float input, dynamic batch
    targets = {str(node.target) for node in program.graph.nodes}
    assert "simplenet_fast.patch_scores.default" in targets
    torch.export.save(program, tmp_path / "scoring.pt2")
    loaded = torch.export.load(tmp_path / "scoring.pt2").module()
    crops = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8, generator=generator)
    expected = model(crops)
    for batch in (1, 3):
        images = crops[:batch].permute(0, 3, 1, 2).float() / 255.0
        pred_score, amap, scores = loaded(images)
        assert relative_error(pred_score, expected.pred_score[:batch]) < FLOAT32_TOL
        assert relative_error(amap, expected.anomaly_map[:batch]) < FLOAT32_TOL
        assert relative_error(scores, expected.patch_scores[:batch]) < FLOAT32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_score_compile_matches_eager(device, generator):
    torch.manual_seed(0)
    model = SimpleNet(TinyBackbone(), image_size=40, resize=44, pretrain_embed_dim=30,
                      target_embed_dim=23, hidden=20)
    randomize_head(model.head, generator)
    model.to(device)
    images = [torch.rand(3, 50, 47, generator=generator) for _ in range(4)]
    expected = model.score(images, batch_size=2)
    torch._dynamo.reset()
    seen = []
    actual = model.score(images, batch_size=2, compile=True, progress=seen.append)
    assert seen == [2, 2]
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        assert relative_error(getattr(actual, name), getattr(expected, name)) < FLOAT32_TOL
    with torch.no_grad():
        model.head.adaptor.bias.add_(0.5)  # the compiled path reads the current weights
    assert relative_error(model.score(images, batch_size=2, compile=True).pred_score,
                          model.score(images, batch_size=2).pred_score) < FLOAT32_TOL
