"""Where the runtime keeps its files: ``--data-dir`` > ``$VTUBER_DATA_DIR`` > per-user dir."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

from bot.errors import BotError

EXIT_CANTCREAT = 73  # BSD EX_CANTCREAT


class DataDirError(BotError):
    """The data dir cannot be created or written."""

    exit_code = EXIT_CANTCREAT


@dataclass(frozen=True, slots=True)
class DataPaths:
    data_dir: Path
    cache_dir: Path

    @property
    def sqlite_file(self) -> Path:
        return self.data_dir / "vtuber.db"

    @property
    def spool_file(self) -> Path:
        """What the store could not take during an outage (``bot.spool_file``)."""
        return self.data_dir / "spool.jsonl"

    @classmethod
    def resolve(cls, data_dir: str | Path | None) -> DataPaths:
        chosen = data_dir or os.environ.get("VTUBER_DATA_DIR") or user_data_dir("vtuber-bot")
        root = Path(chosen).expanduser().resolve()
        # The converted bundled model (~500 MB, ~30 s to make) is the same for every data dir:
        # one copy per user, in the user cache dir, unless $VTUBER_CACHE_DIR says otherwise.
        cache = os.environ.get("VTUBER_CACHE_DIR") or user_cache_dir("vtuber-bot")
        return cls(root, Path(cache).expanduser().resolve())

    def ensure(self) -> None:
        """Create the data dir if needed; a file in the way or a missing permission is one
        line (``DataDirError``), not a traceback. (A read-only one is the store's to report:
        it says which file.)"""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise DataDirError(f"data dir {self.data_dir}: a file is in the way (choose "
                               "another --data-dir)") from None
        except OSError as exc:
            raise DataDirError(f"data dir {self.data_dir} cannot be created: "
                               f"{exc.strerror or exc}") from None
