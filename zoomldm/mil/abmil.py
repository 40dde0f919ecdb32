"""Gated-attention MIL (ABMIL, Ilse et al. ICML 2018) and slide-grouped k-fold cross-validation.

Used for the ZoomLDM MIL table (TCGA-BRCA subtyping / HRD from frozen features; official-implementation.md
§7.1). The aggregator and protocol are not in the ZoomLDM repo [assumption]: we follow CLAM-style gated ABMIL
(peers-and-metrics.md §7): fc in_dim -> hidden + ReLU + dropout, gated attention
a_k = softmax_k(w^T [tanh(V h_k) ⊙ sigm(U h_k)]) (Ilse et al. eq. 9), z = Σ_k a_k h_k, linear classifier.
Training: Adam, cross-entropy, one bag per step, a fixed number of epochs (no early stopping: there is no
validation split inside a fold); the last epoch's model is scored on the held-out fold.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

log = logging.getLogger(__name__)

__all__ = ["ABMIL", "cross_validate", "train_abmil", "predict_proba"]


class ABMIL(nn.Module):
    """Gated attention MIL: bag (n_instances, in_dim) -> (logits (n_classes,), attention (n_instances,))."""

    def __init__(self, in_dim: int, hidden: int = 128, attn_dim: int = 128, n_classes: int = 2,
                 dropout: float = 0.25):
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)  # V in Ilse et al. eq. 9 (tanh branch)
        self.attn_u = nn.Linear(hidden, attn_dim)  # U (sigmoid gate)
        self.attn_w = nn.Linear(attn_dim, 1)  # w
        self.attn_drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(f"bag must have shape (n_instances, {self.in_dim}), got {tuple(bag.shape)}")
        h = self.fc(bag)  # (n, hidden)
        gated = self.attn_drop(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))  # (n, attn_dim)
        a = torch.softmax(self.attn_w(gated).squeeze(-1), dim=0)  # (n,)
        z = a @ h  # (hidden,)
        return self.classifier(z), a


def train_abmil(bags: Sequence[np.ndarray], labels: Sequence[int], n_classes: int, seed: int = 0,
                epochs: int = 20, lr: float = 2e-4, weight_decay: float = 1e-5, hidden: int = 128,
                attn_dim: int = 128, dropout: float = 0.25, device: str | torch.device = "cpu") -> ABMIL:
    """Train one ABMIL from scratch; deterministic given ``seed`` (the caller's torch RNG is restored)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = ABMIL(bags[0].shape[1], hidden, attn_dim, n_classes, dropout).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        xs = [torch.as_tensor(b, dtype=torch.float32, device=device) for b in bags]
        ys = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        order_rng = np.random.default_rng(seed)
        model.train()
        for epoch in range(epochs):
            total = 0.0
            for i in order_rng.permutation(len(xs)):
                logits, _ = model(xs[i])
                loss = F.cross_entropy(logits[None], ys[i:i + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
            log.debug("epoch %d mean loss %.4f", epoch, total / len(xs))
    return model.eval()


@torch.no_grad()
def predict_proba(model: ABMIL, bags: Sequence[np.ndarray]) -> np.ndarray:
    """Class probabilities (n_bags, n_classes)."""
    model.eval()
    dev = next(model.parameters()).device
    probs = [torch.softmax(model(torch.as_tensor(b, dtype=torch.float32, device=dev))[0], -1) for b in bags]
    return torch.stack(probs).cpu().numpy()


def _auc(y: np.ndarray, prob: np.ndarray, n_classes: int) -> float:
    if len(np.unique(y)) < 2:
        warnings.warn("a test fold holds a single class: AUC undefined (nan)", stacklevel=3)
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    if len(np.unique(y)) < n_classes:
        warnings.warn("a test fold misses a class: multi-class AUC undefined (nan)", stacklevel=3)
        return float("nan")
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def _splitter(labels: np.ndarray, groups: np.ndarray, k: int, seed: int):
    """StratifiedGroupKFold when every class spans >= k groups, else GroupKFold (no stratification)."""
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise ValueError(f"k={k} folds need at least {k} distinct slide ids, got {n_groups}")
    per_class = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
    if per_class >= k:
        return "StratifiedGroupKFold", StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    log.warning("a class spans only %d slide ids (< k=%d): falling back to GroupKFold", per_class, k)
    return "GroupKFold", GroupKFold(n_splits=k)


def _fit_standardizer(train_bags: list[np.ndarray]):
    """b -> (b − μ) / σ: μ per feature, σ one number (the RMS spread of the centred training instances, floored
    at 1e-6), so the offset goes and the scale becomes ~1 while the features keep their relative spreads
    (a per-feature σ would blow low-variance noise features up to the size of the informative ones)."""
    x = np.concatenate(train_bags, axis=0)
    mu = x.mean(0, keepdims=True)
    sd = max(float(np.sqrt(((x - mu) ** 2).mean())), 1e-6)
    return lambda b: ((b - mu) / sd).astype(np.float32)


def cross_validate(bags: list[np.ndarray], labels, slide_ids, k: int = 5, seed: int = 0, epochs: int = 20,
                   lr: float = 2e-4, weight_decay: float = 1e-5, hidden: int = 128, attn_dim: int = 128,
                   dropout: float = 0.25, device: str | torch.device = "cpu",
                   num_threads: int | None = None, standardize: bool = True) -> dict:
    """k-fold ABMIL cross-validation split by slide id (no slide in both train and test).

    ``slide_ids`` are the grouping unit (pass patient ids for patient-level splits). Fold ``i`` trains with
    seed ``seed * 1000 + i``. ``standardize``: centre every feature on the mean of the fold's training
    instances and divide by their overall spread (applied to its test bags too): features of a generative model's blocks can sit on a
    large constant offset with little spread (the demo UNet's middle block: std 0.03 around |mean| 0.5), which
    an unnormalised ABMIL barely learns from in a few epochs. ``num_threads``: torch CPU threads while training (restored afterwards); small
    bags are latency-bound and run fastest with 1, leave ``None`` for large bags of wide features.

    Returns a JSON-ready dict: per-fold ``auc`` / ``balanced_accuracy`` (+ sizes), their ``*_mean`` /
    ``*_std`` (population std over folds; NaN folds ignored), the splitter used and the hyper-parameters.
    """
    labels = np.asarray(labels).astype(int)
    groups = np.asarray(slide_ids)
    if not (len(bags) == len(labels) == len(groups)):
        raise ValueError(f"bags ({len(bags)}), labels ({len(labels)}) and slide_ids ({len(groups)}) "
                         "differ in length")
    dims = {b.shape[1] if b.ndim == 2 else None for b in bags}
    if len(dims) != 1 or None in dims:
        raise ValueError(f"every bag must be 2-D (n_instances, D) with one common D; got D values {dims}")
    n_classes = max(2, int(labels.max()) + 1)
    split_name, splitter = _splitter(labels, groups, k, seed)
    hp = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, hidden=hidden, attn_dim=attn_dim,
              dropout=dropout)

    folds = []
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        for fold, (tr, te) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            scale = _fit_standardizer([bags[i] for i in tr]) if standardize else (lambda b: b)
            model = train_abmil([scale(bags[i]) for i in tr], labels[tr], n_classes, seed=seed * 1000 + fold,
                                device=device, **hp)
            prob = predict_proba(model, [scale(bags[i]) for i in te])  # (n_test, n_classes)
            y = labels[te]
            folds.append(dict(fold=fold, n_train=int(len(tr)), n_test=int(len(te)),
                              auc=_auc(y, prob, n_classes),
                              balanced_accuracy=float(balanced_accuracy_score(y, prob.argmax(1)))))
            log.info("fold %d: AUC %.4f, balanced acc %.4f", fold, folds[-1]["auc"],
                     folds[-1]["balanced_accuracy"])
    finally:
        torch.set_num_threads(prev_threads)

    out: dict = dict(folds=folds, splitter=split_name, k=k, seed=seed, n_bags=len(bags), n_classes=n_classes,
                     standardize=standardize, **hp)
    for m in ("auc", "balanced_accuracy"):
        v = np.array([f[m] for f in folds], dtype=float)
        finite = np.isfinite(v).any()
        out[f"{m}_mean"] = float(np.nanmean(v)) if finite else float("nan")
        out[f"{m}_std"] = float(np.nanstd(v)) if finite else float("nan")
    return out
