"""The errors table: one row per input that a stage could not use, with the reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from refface.manifests.atomic import write_parquet, write_text

ERRORS_COLUMNS = ["path", "stage", "reason"]


class ImageError(Exception):
    """An input image that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ErrorRow:
    path: str
    stage: str
    reason: str


class ErrorsTable:
    """Collects error rows and writes them as ``errors.parquet`` + ``errors.csv``."""

    def __init__(self, rows: list[ErrorRow] | None = None):
        self.rows: list[ErrorRow] = list(rows or [])

    def add(self, path: str, stage: str, reason: str) -> None:
        self.rows.append(ErrorRow(str(path), stage, reason))

    def extend(self, rows) -> None:
        for row in rows:
            self.rows.append(row if isinstance(row, ErrorRow) else ErrorRow(**row))

    def __len__(self) -> int:
        return len(self.rows)

    def counts_by_stage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.stage] = counts.get(row.stage, 0) + 1
        return counts

    def to_frame(self) -> pd.DataFrame:
        df = pd.DataFrame([asdict(r) for r in self.rows], columns=ERRORS_COLUMNS)
        return df.sort_values(["stage", "path"], kind="stable").reset_index(drop=True)

    def write(self, root: str | Path, name: str = "errors") -> None:
        df = self.to_frame()
        write_parquet(Path(root) / f"{name}.parquet", df)
        write_text(Path(root) / f"{name}.csv", df.to_csv(index=False))

    @classmethod
    def read(cls, root: str | Path, name: str = "errors") -> ErrorsTable:
        path = Path(root) / f"{name}.parquet"
        if not path.exists():
            return cls()
        return cls(
            [ErrorRow(**{str(k): v for k, v in r.items()}) for r in pd.read_parquet(path).to_dict("records")]
        )
