"""A uvicorn server for callgrind_server.py: one bench_apps variant plus two marker routes.

    python -m benchmarks._cg_server VARIANT LOOP PORT TIME_SCALE

``GET /_cg/zero`` calls ``os.getppid()`` and ``GET /_cg/dump`` calls ``os.getpgrp()``, which
callgrind (``--zero-before=os_getppid --dump-before=os_getpgrp``) turns into "zero the
counters" and "dump them". The routes come after the measured one, so they cost its requests
nothing. loopwatch's timers are stretched by TIME_SCALE, the slowdown under callgrind.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    variant, loop, port, scale = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    os.environ["LOOPWATCH_PROBE_INTERVAL"] = str(0.01 * scale)
    os.environ["LOOPWATCH_BLOCK_THRESHOLD"] = str(min(0.1 * scale, 60.0))
    import uvicorn
    from fastapi import FastAPI

    from . import bench_apps
    from loopwatch import _monitor, _waiting

    _monitor._TICK_SECONDS = 1.0 * scale  # type: ignore[attr-defined]
    # and the gaps by which steps tell a pause and a long run (see loopwatch._waiting)
    _monitor.IDLE_GAP = _waiting.IDLE_GAP * scale  # type: ignore[attr-defined]
    _monitor.LOOK_AFTER = _waiting.LOOK_AFTER * scale  # type: ignore[attr-defined]
    app: FastAPI = bench_apps.VARIANTS[variant]()

    @app.get("/_cg/zero")
    async def zero() -> dict[str, bool]:
        os.getppid()
        return {"ok": True}

    @app.get("/_cg/dump")
    async def dump() -> dict[str, bool]:
        os.getpgrp()
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, loop=loop, http="httptools",
                access_log=False, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
