"""Gated ABMIL: shapes, attention, determinism, and slide-grouped CV on a synthetic key-instance task."""

import numpy as np
import pytest
import torch

from zoomldm.mil.abmil import ABMIL, cross_validate


def _synthetic_bags(n_bags=60, dim=16, seed=0):
    """Instances come from 6 prototype 'tissue types' plus noise; a bag is positive iff it holds 1-3
    instances of the key type (MNIST-bags style, Ilse et al. 2018). Two bags per slide, sharing the slide's
    label, so a slide-grouped split must keep them together."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(6, dim)) * 1.5  # type 5 is the key type
    bags, labels, slides = [], [], []
    for i in range(n_bags):
        y = (i // 2) % 2
        types = rng.integers(0, 5, size=rng.integers(8, 25))
        if y:
            types[rng.choice(len(types), size=rng.integers(1, 4), replace=False)] = 5
        x = protos[types] + 0.5 * rng.normal(size=(len(types), dim))
        bags.append(x.astype(np.float32))
        labels.append(y)
        slides.append(f"slide{i // 2:03d}")
    return bags, np.array(labels), np.array(slides)


def test_forward_shapes_and_attention():
    torch.manual_seed(0)
    model = ABMIL(in_dim=16, hidden=32, attn_dim=24, n_classes=3, dropout=0.0).eval()
    logits, attn = model(torch.randn(11, 16))
    assert logits.shape == (3,) and attn.shape == (11,)
    assert torch.all(attn >= 0) and attn.sum().item() == pytest.approx(1.0, abs=1e-6)
    # permutation invariance of attention pooling
    perm = torch.randperm(11)
    x = torch.randn(11, 16)
    l1, a1 = model(x)
    l2, a2 = model(x[perm])
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1[perm], a2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(n_instances, 16\)"):
        model(torch.randn(11, 15))


CV_KW = dict(k=5, seed=0, epochs=4, lr=2e-3, hidden=32, attn_dim=32, dropout=0.0, num_threads=1)


def test_cv_learns_key_instance_task():
    bags, labels, slides = _synthetic_bags()
    res = cross_validate(bags, labels, slides, **CV_KW)
    assert res["splitter"] == "StratifiedGroupKFold" and len(res["folds"]) == 5
    assert sum(f["n_test"] for f in res["folds"]) == len(bags)
    assert res["auc_mean"] >= 0.95, res
    assert res["balanced_accuracy_mean"] >= 0.8, res


def test_cv_deterministic_and_slide_grouped():
    bags, labels, slides = _synthetic_bags(n_bags=30, seed=3)
    kw = {**CV_KW, "k": 3, "epochs": 2}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = cross_validate(bags, labels, slides, **kw)
    assert torch.rand(1) == before  # the caller's torch RNG is untouched
    b = cross_validate(bags, labels, slides, **kw)
    assert a["folds"] == b["folds"]
    c = cross_validate(bags, labels, slides, **{**kw, "seed": 1})
    assert a["folds"] != c["folds"]


def test_cv_near_chance_on_shuffled_labels():
    # One CV on 30 slides has a wide null spread (fold AUC std ~0.15-0.2): average three label permutations.
    bags, labels, slides = _synthetic_bags(seed=1)
    uniq = np.unique(slides)
    means = []
    for perm_seed in range(3):
        perm = np.random.default_rng(perm_seed).permutation([0, 1] * (len(uniq) // 2))
        slide_label = dict(zip(uniq, perm))
        shuffled = np.array([slide_label[s] for s in slides])  # labels permuted across slides
        means.append(cross_validate(bags, shuffled, slides, **CV_KW)["auc_mean"])
    assert abs(np.mean(means) - 0.5) <= 0.2, means


def test_cv_input_errors():
    bags, labels, slides = _synthetic_bags(n_bags=12)
    with pytest.raises(ValueError, match="differ in length"):
        cross_validate(bags, labels[:-1], slides)
    with pytest.raises(ValueError, match="distinct slide ids"):
        cross_validate(bags, labels, np.array(["s0", "s1"] * 6), k=5)


def test_standardized_cv_ignores_a_feature_offset_and_scale():
    """Features on a large constant offset with little spread (a generative model's block output) give the
    same CV result as the centred ones once each fold z-scores with its training statistics; without that the
    key-instance task is barely learned."""
    bags, labels, slides = _synthetic_bags()
    shifted = [(50.0 + 0.01 * b).astype(np.float32) for b in bags]
    res = cross_validate(bags, labels, slides, **CV_KW)
    res_shifted = cross_validate(shifted, labels, slides, **CV_KW)
    assert abs(res_shifted["auc_mean"] - res["auc_mean"]) < 0.02 and res["standardize"] is True
    raw = cross_validate(shifted, labels, slides, standardize=False, **CV_KW)
    assert raw["auc_mean"] < res_shifted["auc_mean"] - 0.1, (raw["auc_mean"], res_shifted["auc_mean"])
