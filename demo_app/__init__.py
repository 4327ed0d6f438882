"""The loopwatch demo: the article's FastAPI backend, an upstream simulator and a load generator.

Run everything on one machine with ``.venv/bin/python -m demo_app`` (after
``bash scripts/demo.sh``); see ``--help``.
"""

from .app import create_app
from .config import ConfigError, Settings

__all__ = ["ConfigError", "Settings", "create_app"]
