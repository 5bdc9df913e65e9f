"""Helpers of the vLLM service's tests."""

from pathlib import Path


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper that a container may not have)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
