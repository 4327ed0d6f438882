"""loopwatch: find what blocks your asyncio event loop.

Measures event-loop lag, loop busy time and per-request blocking time, catches every block
with the exact line that blocked and a hint for the async replacement, and exports it all as
Prometheus metrics::

    app.add_middleware(loopwatch.LoopWatchMiddleware)
    app.mount("/metrics", loopwatch.metrics_app())
"""

from ._admission import Admission
from ._apps import events_app, metrics_app
from ._attribution import Owner, owner_scope
from ._config import Config
from ._events import BlockEvent, Frame
from ._middleware import LoopWatchMiddleware
from ._monitor import Monitor, Sink, get_monitor
from ._ui import ui_app
from ._watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "BlockEvent",
    "Config",
    "Frame",
    "LoopWatchMiddleware",
    "Monitor",
    "Owner",
    "Sink",
    "Watch",
    "__version__",
    "events_app",
    "get_monitor",
    "metrics_app",
    "owner_scope",
    "ui_app",
    "watch",
]
