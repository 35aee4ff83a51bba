"""Where the runtime keeps its files: ``--data-dir`` > ``$VTUBER_DATA_DIR`` > per-user dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir


@dataclass(frozen=True, slots=True)
class DataPaths:
    data_dir: Path
    cache_dir: Path

    @property
    def sqlite_file(self) -> Path:
        return self.data_dir / "vtuber.db"

    @classmethod
    def resolve(cls, data_dir: str | Path | None) -> DataPaths:
        chosen = data_dir or os.environ.get("VTUBER_DATA_DIR") or user_data_dir("vtuber-bot")
        root = Path(chosen).expanduser().resolve()
        # The converted model cache may be shared between data dirs (tests, several personas).
        cache = os.environ.get("VTUBER_CACHE_DIR")
        return cls(root, Path(cache).expanduser().resolve() if cache else root / "cache")
