"""Identity-disjoint train/val/test splits, sized in ReF-LDM's proportions and deterministic per seed."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pandas as pd

from refface.manifests.layout import SPLITS
from refface.seeding import item_seed

# FFHQ-Ref (ReF-LDM §4): identities with references split 6,073 / 300 / 150 (images 18,816 / 732 / 857).
PAPER_IDENTITIES = {"train": 6073, "val": 300, "test": 150}
PAPER_IMAGES = {"train": 18816, "val": 732, "test": 857}


@dataclass(frozen=True)
class SplitConfig:
    """How identities are assigned to splits.

    Attributes:
        seed: the split is a function of (seed, identity), independent of input order and workers.
        val_fraction / test_fraction: share of multi-image identities per split (paper: 300 and 150 of 6,523).
        val_identities / test_identities: absolute identity counts; override the fractions when set.
        min_eval_size: identities smaller than this stay in train (a val/test target needs 2 references).
        balance_column: attribute column to balance the test identities over (e.g. ``race``); None = off.
        singleton_split: where images without an identity (singletons, no face) go; they cannot leak.
    """

    seed: int = 0
    val_fraction: float = PAPER_IDENTITIES["val"] / sum(PAPER_IDENTITIES.values())
    test_fraction: float = PAPER_IDENTITIES["test"] / sum(PAPER_IDENTITIES.values())
    val_identities: int | None = None
    test_identities: int | None = None
    min_eval_size: int = 3
    balance_column: str | None = None
    singleton_split: str = "train"

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave identities for train")
        if self.singleton_split not in SPLITS:
            raise ValueError(
                f"singleton_split must be one of {', '.join(SPLITS)}, got {self.singleton_split!r}"
            )
        for name in ("val_identities", "test_identities"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")


def _count(fraction: float, absolute: int | None, total: int) -> int:
    if absolute is not None:
        return int(absolute)
    if fraction <= 0 or total == 0:
        return 0
    # At least one identity per evaluation split once there is something to split.
    return max(1, int(round(fraction * total)))


def identity_attribute(paths_by_identity: dict[str, list[str]], attributes: pd.Series) -> dict[str, str]:
    """Majority attribute value per identity (ties: the smallest value); missing values are ignored."""
    out = {}
    for key, paths in paths_by_identity.items():
        values = attributes.reindex(paths).dropna().astype(str)
        if values.empty:
            out[key] = ""
            continue
        counts = values.value_counts()
        top = counts.max()
        out[key] = sorted(counts[counts == top].index)[0]
    return out


def assign_splits(
    table: pd.DataFrame,
    config: SplitConfig,
    attributes: pd.Series | None = None,
    eligible: Collection[int] | None = None,
) -> pd.DataFrame:
    """Assign every image to train/val/test so that no identity spans two splits.

    Args:
        table: ``path, identity`` (identity -1 = singleton or no face).
        config: split rules.
        attributes: optional per-path attribute values (index = path) for ``balance_column``.
        eligible: identities allowed in val/test (e.g. those with a target holding >= 2 references);
            default: identities of at least ``min_eval_size`` images.

    Returns:
        ``path, identity, split`` sorted by path.
    """
    df = table[["path", "identity"]].copy()
    df["identity"] = df["identity"].astype(int)
    groups: dict[int, list[str]] = {}
    for path, ident in zip(df["path"], df["identity"], strict=True):
        if ident >= 0:
            groups.setdefault(int(ident), []).append(path)
    # Key each identity by its first path so the split does not depend on how labels were numbered.
    key_of = {ident: min(paths) for ident, paths in groups.items()}
    multi = [i for i, p in groups.items() if len(p) >= 2]
    ranked = sorted(multi, key=lambda i: (item_seed(config.seed, key_of[i]), key_of[i]))
    if eligible is None:
        allowed = [i for i in ranked if len(groups[i]) >= config.min_eval_size]
    else:
        eligible_set = set(int(e) for e in eligible)
        allowed = [i for i in ranked if i in eligible_set and len(groups[i]) >= config.min_eval_size]
    n_test = min(_count(config.test_fraction, config.test_identities, len(multi)), len(allowed))
    if config.balance_column and attributes is not None:
        attr = identity_attribute({key_of[i]: groups[i] for i in allowed}, attributes)
        by_value: dict[str, list[int]] = {}
        for i in allowed:
            by_value.setdefault(attr[key_of[i]], []).append(i)
        test: list[int] = []
        # Round-robin over attribute values: each value gets its turn, in seed order within the value.
        queues = [by_value[v] for v in sorted(by_value)]
        while len(test) < n_test and any(queues):
            for q in queues:
                if q and len(test) < n_test:
                    test.append(q.pop(0))
    else:
        test = allowed[:n_test]
    test_set = set(test)
    rest = [i for i in allowed if i not in test_set]
    n_val = min(_count(config.val_fraction, config.val_identities, len(multi)), len(rest))
    val_set = set(rest[:n_val])
    split_of = {}
    for ident in groups:
        split_of[ident] = "test" if ident in test_set else "val" if ident in val_set else "train"
    # Identities too small for val/test (including one-image labels) train; unlabeled images follow the config.
    df["split"] = [
        split_of.get(int(i), "train") if i >= 0 else config.singleton_split for i in df["identity"]
    ]
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def split_summary(assigned: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images and identities per split (identities counted over labels >= 0)."""
    out = {}
    for split in SPLITS:
        part = assigned[assigned["split"] == split]
        out[split] = {
            "images": int(len(part)),
            "identities": int(part.loc[part["identity"] >= 0, "identity"].nunique()),
        }
    return out
