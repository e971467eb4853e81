"""`simplenet_fast.score(images)` as written: the default model from `simplenet_fast.use(...)` or
the SIMPLENET_FAST_MODEL environment variable (simplenet_fast/model.py, module level)."""
from __future__ import annotations

import os
import threading

import pytest
import torch

import simplenet_fast
from simplenet_fast import SimpleNet
from simplenet_fast import model as model_module

SIZE, RESIZE = 32, 36
HEAD = dict(pretrain_embed_dim=48, target_embed_dim=40, hidden=24)
IMAGES = torch.rand(2, 3, RESIZE, RESIZE, generator=torch.Generator().manual_seed(0))


def saved_model(path, seed: int) -> SimpleNet:
    """A small EfficientNet-Lite0 model (random weights: stored in the file), saved to `path`."""
    torch.manual_seed(seed)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=SIZE, resize=RESIZE, **HEAD)
    model.save(path)
    return model


@pytest.fixture(autouse=True)
def clean_defaults(monkeypatch):
    """No default model, no environment variable, an empty cache of loaded models."""
    monkeypatch.setattr(model_module, "_DEFAULT", None)
    monkeypatch.setattr(model_module, "_LOADED", {})
    monkeypatch.delenv("SIMPLENET_FAST_MODEL", raising=False)


@pytest.fixture
def loads(monkeypatch):
    """Paths SimpleNet.load was called with."""
    calls = []
    original = SimpleNet.load.__func__

    def counting_load(cls, *args, **kwargs):
        calls.append(os.fspath(args[0]))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SimpleNet, "load", classmethod(counting_load))
    return calls


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    a, b = folder / "a.pt", folder / "b.pt"
    return (saved_model(a, 0), a), (saved_model(b, 1), b)


def same(result, model: SimpleNet) -> bool:
    return torch.equal(result.pred_score, model.score(IMAGES).pred_score)


def test_without_a_default_the_error_names_both_ways():
    with pytest.raises(ValueError) as error:
        simplenet_fast.score(IMAGES)
    message = str(error.value)
    assert "simplenet_fast.use(model_or_path)" in message
    assert "SIMPLENET_FAST_MODEL" in message
    assert "`simplenet-fast train` makes one" in message


def test_empty_environment_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", "")
    with pytest.raises(ValueError, match="no model to use"):
        simplenet_fast.score(IMAGES)


def test_environment_variable_is_read_at_every_call(two_models, monkeypatch, loads):
    (model_a, a), (model_b, b) = two_models
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(a))
    first = simplenet_fast.score(IMAGES)
    again = simplenet_fast.score(IMAGES, batch_size=1)  # keyword arguments reach SimpleNet.score
    assert same(first, model_a) and torch.equal(again.pred_score, first.pred_score)
    assert loads == [str(a)]  # cached: loaded once
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(b))
    assert same(simplenet_fast.score(IMAGES), model_b)
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(a))
    assert same(simplenet_fast.score(IMAGES), model_a)
    assert loads == [str(a), str(b)]  # both still cached


def test_environment_variable_naming_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="SIMPLENET_FAST_MODEL names the model file"):
        simplenet_fast.score(IMAGES)


def test_use_takes_precedence_over_the_environment_and_model_over_use(two_models, monkeypatch):
    (model_a, a), (model_b, b) = two_models
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(a))
    assert simplenet_fast.use(model_b) is model_b
    assert same(simplenet_fast.score(IMAGES), model_b)
    assert same(simplenet_fast.score(IMAGES, model=a), model_a)  # an explicit model wins
    assert simplenet_fast.use(None) is None                      # cleared: the variable again
    assert same(simplenet_fast.score(IMAGES), model_a)


def test_use_of_a_path_loads_it_once_and_follows_rewrites(tmp_path, loads):
    path = tmp_path / "m.pt"
    model = saved_model(path, 0)
    loaded = simplenet_fast.use(path)
    assert isinstance(loaded, SimpleNet) and loads == [str(path)]  # loaded (checked) at once
    assert same(simplenet_fast.score(IMAGES), model)
    assert same(simplenet_fast.score(IMAGES, device="cpu"), model)
    assert loads == [str(path)]
    rewritten = saved_model(path, 1)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert same(simplenet_fast.score(IMAGES), rewritten)
    assert len(loads) == 2


def test_use_refuses_bad_arguments_and_keeps_the_previous_default(two_models, tmp_path):
    (model_a, _), _ = two_models
    simplenet_fast.use(model_a)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        simplenet_fast.use(tmp_path / "gone.pt")
    with pytest.raises(TypeError, match="SimpleNet or the path"):
        simplenet_fast.use(42)
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(ValueError, match="junk.pt"):  # SimpleNet.load refuses it
        simplenet_fast.use(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="device applies to a model path"):
        simplenet_fast.use(model_a, device="cpu")
    with pytest.raises(ValueError, match="device applies to a model path"):
        simplenet_fast.score(IMAGES, device="cpu")  # the default here is a SimpleNet
    assert same(simplenet_fast.score(IMAGES), model_a)


def test_relative_path_survives_a_change_of_directory(tmp_path, monkeypatch):
    model = saved_model(tmp_path / "m.pt", 0)
    monkeypatch.chdir(tmp_path)
    simplenet_fast.use("m.pt")
    monkeypatch.chdir(tmp_path.parent)
    assert same(simplenet_fast.score(IMAGES), model)


def test_threads_share_the_default_and_the_cache(two_models, monkeypatch, loads):
    """Threads scoring through the environment variable load the file once; threads switching
    the default with use() while others score always get one of the two models' answers."""
    (model_a, a), (model_b, b) = two_models
    expected = {str(a): model_a.score(IMAGES).pred_score, str(b): model_b.score(IMAGES).pred_score}
    monkeypatch.setenv("SIMPLENET_FAST_MODEL", str(a))
    results, errors = [], []
    start = threading.Barrier(8)

    def score_default(switch: bool, i: int):
        try:
            start.wait()
            for _ in range(3):
                if switch:
                    simplenet_fast.use((a, b)[i % 2])
                results.append(simplenet_fast.score(IMAGES).pred_score)
        except Exception as error:  # reported below
            errors.append(error)

    for switch in (False, True):
        results.clear()
        threads = [threading.Thread(target=score_default, args=(switch, i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 24
        if not switch:
            assert loads == [str(a)]
            assert all(torch.equal(r, expected[str(a)]) for r in results)
        else:
            assert all(any(torch.equal(r, e) for e in expected.values()) for r in results)
    assert sorted(set(loads)) == sorted({str(a), str(b)}) and len(loads) == 2
