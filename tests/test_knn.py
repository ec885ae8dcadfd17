"""The weighted kNN vote against a hand-written loop."""

from __future__ import annotations

import math

import torch

from meddino.metrics.knn import knn_scores


def _reference(train, labels, query, k, T, C):
    out = []
    for q in query:
        qn = q / q.norm()
        sims = [(float(qn @ (t / t.norm())), int(y)) for t, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * C
        for s, y in sims[:k]:
            votes[y] += math.exp(s / T)
        total = sum(votes)
        out.append([v / total for v in votes])
    return torch.tensor(out)


def test_knn_matches_loop():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(30, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    query = torch.randn(7, 8, generator=g)
    got = knn_scores(train, labels, query, k=5, temperature=0.07, num_classes=3, chunk_size=3)
    torch.testing.assert_close(got, _reference(train, labels, query, 5, 0.07, 3), atol=1e-5, rtol=1e-5)


def test_knn_obvious_clusters_and_multilabel():
    train = torch.cat([torch.randn(10, 4) * 0.05 + torch.tensor([5.0, 0, 0, 0]), torch.randn(10, 4) * 0.05 + torch.tensor([0, 5.0, 0, 0])])
    labels = torch.tensor([0] * 10 + [1] * 10)
    query = torch.tensor([[1.0, 0.1, 0, 0], [0.1, 1.0, 0, 0]])
    assert knn_scores(train, labels, query, k=20).argmax(1).tolist() == [0, 1]
    multi = torch.stack([labels == 0, torch.ones(20, dtype=torch.bool)], 1)
    scores = knn_scores(train, multi, query, k=5)
    assert scores.shape == (2, 2)
    torch.testing.assert_close(scores[:, 1], torch.ones(2))
    assert scores[0, 0] > 0.99 and scores[1, 0] < 0.01
