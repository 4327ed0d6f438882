"""The benchmarks' result files as typed records: what report.py reads, and nothing it does not.

Each top-level record (a subclass of :class:`Result`) is one ``<NAME>.json``, in the format its
benchmark writes. :func:`load` reads the newest: this checkout's own (``benchmarks/out/``),
else the committed reference (``benchmarks/results/``). pydantic checks every field a record
declares, strictly (keys it does not declare are ignored); :func:`read` raises ``ValueError``
naming the file and each field that is missing or of the wrong type. A field's alias is the
JSON key it is read from when that is not a Python name; a :class:`Variants` record keeps the
keys its fields do not name (the variants beside fixed keys, e.g. ``{"bare": ...,
"loopwatch": ..., "loopwatch_vs_lightest": 0.05}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._common import OUT, RESULTS, ROOT

R = TypeVar("R", bound="Record")
T = TypeVar("T", bound="Result")
V = TypeVar("V", bound="Record")
#: A JSON number; an int stays an int (a ``float`` field would make it ``5.0``, printed so).
Number = int | float


class Record(BaseModel):
    """A JSON object of a result file."""

    model_config = ConfigDict(frozen=True, strict=True)


class Variants(Record, Generic[V]):
    """A record whose keys beside its fields are variants, each a ``V``."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, V] = Field(init=False)

    @property
    def variants(self) -> dict[str, V]:
        return self.__pydantic_extra__


# -- shared ------------------------------------------------------------------------------

class Machine(Record):
    """Where a benchmark ran (``_common.machine()``; headline.py writes fewer keys)."""

    cpu: str | None = None
    cores: int | None = None
    python: str | None = None
    python_build: str = ""
    platform: str | None = None
    packages: dict[str, str | None] = {}
    time: str | None = None


class Result(Record):
    """A whole result file: how it was made, where, and (in subclasses) what it found."""

    NAME: ClassVar[str]
    command: str
    machine: Machine


class Stat(Record):
    """``_common.summary()`` of some samples."""

    median: Number
    q1: Number
    q3: Number
    iqr: Number
    min: Number
    max: Number
    n: int


# -- run_all -----------------------------------------------------------------------------

class Step(Record):
    name: str
    command: str
    loadavg_before: list[Number]
    seconds: Number
    returncode: int


class RunAll(Result):
    """One ``run_all`` of every benchmark."""

    NAME = "run_all"
    mode: str
    started: str
    finished: str
    seconds: Number
    loadavg_end: list[Number]
    steps: list[Step]
    failures: list[str]


# -- overhead ----------------------------------------------------------------------------

class Timed(Stat):
    """µs per request of one variant, ``ratio`` of medians and ``added`` per round vs bare."""

    ratio: Number
    added: Stat


class VsLightest(Record):
    of_medians: Number
    lightest: str


class Clock(Variants[Timed]):
    """Per variant (and ablation), by one clock (CPU or wall)."""

    loopwatch_vs_lightest: VsLightest | None = None


class OverheadLoop(Record):
    wall: Clock
    cpu: Clock


class OverheadConfig(Record):
    requests: int
    rounds: int
    concurrency: int


class Overhead(Result):
    """In-process CPU and wall time per request, per loop."""

    NAME = "overhead"
    config: OverheadConfig
    loops: dict[str, OverheadLoop]


# -- callgrind ---------------------------------------------------------------------------

class Count(Record):
    """Instructions per unit (median slope, range over pairs), vs bare."""

    instructions: Number
    min: Number
    max: Number
    ratio: Number
    added: Number


class CgCount(Count):
    probes_per_unit: Number


class Monitored(Record):
    bare: CgCount
    monitored: CgCount


class Awaits(Record):
    bare: CgCount
    loopwatch: CgCount
    added_per_await: Number


class CallgrindLoop(Record):
    valgrind_seconds: Number
    request: dict[str, CgCount]
    awaits10: Awaits | None = None
    callback: Monitored | None = None
    step: Monitored | None = None
    loopwatch_vs_lightest: Number | None = None


class CallgrindConfig(Record):
    requests: int
    repeats: int
    time_scale: Number


class Callgrind(Result):
    """Instructions per request (and per callback, step, await) under callgrind, per loop."""

    NAME = "callgrind"
    config: CallgrindConfig
    loops: dict[str, CallgrindLoop]


class ServerLoop(Variants[Count]):
    loopwatch_vs_lightest: Number | None = None


class CallgrindServer(Result):
    """Instructions per request of the whole uvicorn server under callgrind, per loop."""

    NAME = "callgrind_server"
    config: CallgrindConfig
    loops: dict[str, ServerLoop]


class Breakdown(Result):
    """Instructions per call of each piece of loopwatch's request path."""

    NAME = "breakdown"
    instructions: dict[str, Number]


# -- wrk_overhead ------------------------------------------------------------------------

class Served(Record):
    """One variant behind uvicorn under wrk, summaries over rounds and ratios to bare."""

    rps: Stat
    latency_p50: Stat
    latency_p99: Stat
    server_cpu_us_per_request: Stat
    errors: int
    rps_ratio: Number
    cpu_ratio: Number


class WrkLoop(Variants[Served]):
    loopwatch_vs_lightest: Number | None = None


class WrkConfig(Record):
    threads: int
    connections: int
    seconds: Number
    rounds: int


class WrkOverhead(Result):
    """End to end: wrk against uvicorn, per loop."""

    NAME = "wrk_overhead"
    config: WrkConfig
    loops: dict[str, WrkLoop]


# -- monitor_cost ------------------------------------------------------------------------

class Paired(Record):
    """Bare vs watched, and the per-round difference."""

    bare: Stat
    monitored: Stat
    added: Stat


class Measure(Paired):
    unit: str


class RequestCpu(Paired):
    added_ratio: Number


class RequestPoint(Record):
    awaits: int
    in_flight: int
    requests: int
    cpu: RequestCpu


class MonitorLoop(Record):
    idle: Measure = Field(alias="idle CPU")
    callback: Measure = Field(alias="per callback")
    step: Measure = Field(alias="per task step")
    #: by axis ("awaits", "in_flight"), then by its value (a JSON key: "1", "10", ...)
    requests: dict[str, dict[str, RequestPoint]]


class MonitorConfig(Record):
    rounds: int
    idle_seconds: Number


class MonitorCost(Result):
    """What a Monitor costs: idle, per callback, per task step, per request; per loop."""

    NAME = "monitor_cost"
    config: MonitorConfig
    loops: dict[str, MonitorLoop]


# -- accuracy ----------------------------------------------------------------------------

class Injected(Record):
    """One injected block and what loopwatch reported (seconds)."""

    loop: str
    kind: str
    injected: Number
    elapsed: Number
    reported: Number | None


class InjectedSummary(Record):
    """The blocks of one loop, kind and size (ms)."""

    loop: str
    kind: str
    injected_ms: Number
    n: int
    reported_ms_median: Number
    elapsed_ms_median: Number
    error_vs_injected_ms_median: Number
    error_vs_injected_ms_max_abs: Number
    error_vs_elapsed_ms_median: Number
    error_vs_elapsed_ms_max_abs: Number
    within_tolerance: int
    exact_line: int


class InjectedResults(Record):
    rows: list[Injected]
    summary: list[InjectedSummary]


class RouteCount(Record):
    real: int
    reported_right: int
    events_naming: int
    exact_line: int


class LineMiss(Record):
    route: str
    duration: Number
    location: str | None
    stack_status: str


class Load(Record):
    ok: int
    blocking: int


class Mixed(Record):
    """Block events matched to the real blocks under mixed load."""

    events: int
    real_blocks: int
    precision: Number | None
    recall: Number | None
    exact_line: int
    exact_line_rate: Number | None
    false_events: list[Any]
    wrong_route: list[Any]
    per_route: dict[str, RouteCount]
    load: Load
    line_misses: list[LineMiss] = []


class Event(Record):
    route: str | None
    duration: Number


class GcEvent(Record):
    duration: Number
    gc_seconds: Number


class Saturation(Record):
    """Non-blocking routes under wrk: every block event is a false one."""

    seconds: Number
    connections: int
    requests: int
    rps: Number
    latency_p99: Number
    false_events: int
    false_events_over_100ms: int
    events: list[Event]
    gc_events: list[GcEvent] = []


class ServedAccuracy(Record):
    threshold: Number
    mixed: Mixed
    saturation: Saturation


class AccuracyConfig(Record):
    reps: int
    cpu_reps: int
    mixed_seconds: Number
    ok_clients: int
    block_clients: int


class Accuracy(Result):
    """Reported vs injected blocks in process; attribution and false events under uvicorn."""

    NAME = "accuracy"
    config: AccuracyConfig
    injected: InjectedResults
    served: dict[str, ServedAccuracy]


# -- headline ----------------------------------------------------------------------------

class Crowd(Record):
    """Simultaneous users of one scenario and when each was answered (seconds)."""

    scenario: str
    users: int
    answered: int
    first_s: Number
    median_s: Number
    last_s: Number
    last_extrapolated: bool
    waits_s: list[Number] | None = None


class SeenEvent(Record):
    route: str | None
    location: str | None
    duration: Number


class Seen(Record):
    """What loopwatch said about the demo: loop time by route (largest first), block events."""

    blocking_by_route: list[tuple[str, Number]] = []
    events: list[SeenEvent] = []


class HeadlineConfig(Record):
    delay_ms: int
    runs: int


class Headline(Result):
    """The seed article's crowds against the demo, and gather vs awaits in a row."""

    NAME = "headline"
    config: HeadlineConfig
    crowds: list[Crowd]
    gather_s: Number
    sequential_s: Number
    loopwatch: Seen | None = None


# -- memory ------------------------------------------------------------------------------

class Sample(Record):
    requests: int
    rss: int
    seconds: Number


class LabelSets(Record):
    request_duration: int
    requests_total: int


class MemoryConfig(Record):
    requests: int
    first: int
    paths: int
    loop: str


class Memory(Result):
    """RSS while loopwatch watches many requests to unknown paths."""

    NAME = "memory"
    config: MemoryConfig
    samples: list[Sample]
    growth_after_first_bytes: int
    peak_growth_after_first_bytes: int
    label_sets: LabelSets
    route_cache_entries: int
    exposition_bytes: int


#: Every result report.py reads.
RESULTS_READ: tuple[type[Result], ...] = (
    RunAll, Overhead, Callgrind, CallgrindServer, Breakdown, WrkOverhead, MonitorCost,
    Accuracy, Headline, Memory)


def read(kind: type[R], path: Path) -> R:
    """The ``kind`` record in the file ``path``."""
    try:
        return kind.model_validate_json(path.read_bytes())
    except ValidationError as error:
        source = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        raise ValueError(f"{source}: {error}") from None


def check(name: str, path: Path) -> None:
    """Read ``path`` as the record of the result ``name``, if the report reads one by that
    name: a writer and the report share one schema."""
    for kind in RESULTS_READ:
        if kind.NAME == name:
            read(kind, path)


def load(kind: type[T]) -> T | None:
    """``kind``'s newest results: this checkout's own run (benchmarks/out/), else the
    committed reference (benchmarks/results/); None if there is neither."""
    for folder in (OUT, RESULTS):
        path = folder / f"{kind.NAME}.json"
        if path.exists():
            return read(kind, path)
    return None
