"""Weighted k-nearest-neighbour vote on frozen features (DINO's kNN protocol, as a pure function).

Features are L2-normalised; each query takes its k most cosine-similar training samples and weights their
labels by exp(similarity / T) (T = 0.07 in DINO and seed 001). The vote is normalised into class scores.
Multi-label targets (multi-hot rows) get the weighted mean of the neighbours' label vectors per label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C] (rows sum to 1) for single-label int labels [N], or label scores [Q, L] in
    [0, 1] for multi-hot labels [N, L]. ``k`` is capped at the number of training samples."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    k = min(int(k), train.shape[0])
    if train_labels.ndim == 1:
        n_out = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
        targets = F.one_hot(train_labels.long(), n_out).float()
    else:
        targets = train_labels.float()
    out = []
    for start in range(0, query.shape[0], chunk_size):
        sims, idx = (query[start : start + chunk_size] @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.einsum("qk,qkc->qc", weights, targets[idx])
        out.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, targets.shape[1])
