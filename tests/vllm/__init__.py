"""Helpers of the vLLM service's tests."""

import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper that a container may not have)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def left_running(pids: list[int], seconds: float = 10.0) -> list[int]:
    """Those of `pids` still alive after waiting up to `seconds` for them to end (an orphan is followed by pid)."""
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
