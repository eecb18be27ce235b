"""What tests in several folders share: the repository root, process and cluster tools,
tiny models and data, weight helpers, launcher and container wrappers (tests/README.md)."""

from pathlib import Path

# The repository root: worker subprocesses and CLI runs start here (the one definition).
REPO_ROOT = Path(__file__).resolve().parents[2]
