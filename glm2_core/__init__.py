"""What the converters, the MindSpore runtime and the validation share: the model config and releases, the
weight-name schema, element types, JSON read with limits, the error types, the bundled tokenizer, and the CLI
vocabulary; and the package's own name, version and cache folder."""
import os
from importlib.metadata import version
from pathlib import Path

PACKAGE = "glm2-toolkit"
__version__ = version(PACKAGE)  # pyproject.toml's, as installed


def cache_dir() -> Path:
    """The package's folder in the user's cache (as XDG_CACHE_HOME says now), never the system temp dir."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / PACKAGE
