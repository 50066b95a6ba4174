"""Second pass of the identity clustering: lone faces join the cluster their neighbours agree on.

Average linkage leaves a person's unusual photos (profile, sunglasses, twenty years younger) alone
when their mean distance to the person's cluster sits just past the cut, and on a large pool these
lone photos of big identities are most of the same-identity pairs a clustering misses. Distance
alone cannot take them back (strangers sit at the same distances), but ranks can: a lone face
joins cluster ``C`` only when

- its ``top`` nearest neighbours all belong to ``C`` (the face itself points at one person),
- at least ``agree`` of ``C``'s members hold the face among their ``|C| + slack`` nearest
  neighbours (the person points back: the face is closer to them than all but a few strangers),
- and its mean distance to ``C``'s members, in units of each pair's same-identity radius, is
  below ``max_distance`` (a loose bound that keeps far outliers out).

A stranger that happens to lie near a cluster fails the second test: the cluster's members have
their own look-alikes closer. Everything runs on the k-NN lists, O(N k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Chosen on the tuning half of lfw_dev's people and the shared photos (docs/mining.md).
TOP = 3
AGREE = 0.7
MAX_DISTANCE = 1.2
SLACK = 3


@dataclass(frozen=True)
class AttachConfig:
    """When a lone face joins a cluster (see the module docstring)."""

    top: int = TOP
    agree: float = AGREE
    max_distance: float = MAX_DISTANCE
    slack: int = SLACK

    def validate(self) -> AttachConfig:
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        if not 0 < self.agree <= 1:
            raise ValueError(f"agree must be in (0, 1], got {self.agree}")
        if self.max_distance <= 0:
            raise ValueError(f"max_distance must be > 0, got {self.max_distance}")
        if self.slack < 0:
            raise ValueError(f"slack must be >= 0, got {self.slack}")
        return self


def attach_lone_faces(
    labels: np.ndarray,
    idx: np.ndarray,
    norm: np.ndarray,
    missing: float,
    config: AttachConfig | None = None,
) -> np.ndarray:
    """Join lone faces to the cluster their neighbours agree on.

    Args:
        labels: (N,) cluster ids (any integers; a face alone is a cluster of one).
        idx: (N, k) each face's nearest neighbours, nearest first (-1 = missing).
        norm: (N, k) the matching distances in units of each pair's same-identity radius.
        missing: the distance a pair outside the k-NN lists (or ``>= missing``) counts as.
        config: the rule's settings.

    Returns:
        (N,) cluster ids (compact, not canonical): the input clusters, some lone faces added.
    """
    cfg = (config or AttachConfig()).validate()
    lab = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64).ravel()
    n, k = idx.shape
    if n == 0 or k == 0:
        return lab
    size = np.bincount(lab)
    top = min(cfg.top, k)
    head = idx[:, :top]
    target = lab[np.maximum(head[:, 0], 0)]
    lone = size[lab] == 1
    cand = (
        lone
        & (head >= 0).all(axis=1)
        & (lab[np.maximum(head, 0)] == target[:, None]).all(axis=1)
        & (size[target] > 1)
    )
    if not cand.any():
        return lab
    # The person points back: members of the target cluster holding the lone face within their
    # |C| + slack nearest neighbours (each member lists a face at most once).
    rank = np.broadcast_to(np.arange(k), (n, k))
    owner = np.broadcast_to(lab[:, None], (n, k))
    nb = np.maximum(idx, 0)
    back = (idx >= 0) & cand[nb] & (target[nb] == owner) & (rank < size[owner] + cfg.slack)
    agree = np.bincount(nb[back], minlength=n) / size[target]
    # Mean distance to the cluster, in radius units; members outside the face's list count as
    # ``missing``.
    inside = (idx >= 0) & (lab[nb] == target[:, None])
    found = np.where(inside, np.minimum(norm, missing), 0.0).sum(axis=1)
    count = inside.sum(axis=1)
    mean = (found + (size[target] - count) * missing) / size[target]
    join = cand & (agree >= cfg.agree) & (mean < cfg.max_distance)
    lab = lab.copy()
    lab[join] = target[join]
    return lab
