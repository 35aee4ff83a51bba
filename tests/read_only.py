"""A folder that even root cannot write to: bind-mounted read-only in a private mount
namespace (``unshare -m``), for the command run there. File permissions are no test as root,
which ignores them (CI runs as root)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest


def _unshare() -> str:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-m", "true"], capture_output=True,
                                         check=False).returncode != 0:
        pytest.skip("needs unshare -m (mount namespaces) to make a read-only file system")
    return unshare


def run_read_only(folder: Path, command: list[str],
                  timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``command`` where ``folder`` is mounted read-only; the rest of the machine as is."""
    where = shlex.quote(str(folder))
    script = (f"mount --bind {where} {where} && mount -o remount,bind,ro {where} && "
              + shlex.join(command))
    return subprocess.run([_unshare(), "-m", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout_s, check=False)
