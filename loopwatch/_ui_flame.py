"""The sampled blocking stacks, aggregated: a tree for the page's icicle, and collapsed-stack
text for flamegraph.pl and speedscope. Weighted by blocked time, in milliseconds.

Each stack starts with the request it blocked (``GET /users/{id}``), then runs from the
outermost frame to the innermost, so the widest leaf is the hottest blocking call. Runs in
a worker thread: the events are frozen and only read here.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Any, NamedTuple

from ._events import BlockEvent
from ._ui_offloop import breathe
from ._ui_paths import short_path

__all__ = ["CHUNK", "MAX_NODES", "News", "Node", "Stacks", "collapsed", "flame"]

#: Nodes narrower than this share of the total are dropped from the page's tree (they would
#: be under a pixel wide); their time stays in their parent.
_MIN_SHARE = 0.001
#: The page's tree never has more nodes than this, whatever the ring holds.
MAX_NODES = 2_000
_BREATHE_EVERY = 32  # stacks: ~0.3 ms of work at most

#: A stack as labels, the request first, then the outermost frame to the innermost.
Labels = tuple[str, ...]
#: Events the page has not labelled yet, taken on the loop at most this many at a time: a
#: ring of 100,000 is labelled in steps, the loop free between them.
CHUNK = 4096


class News(NamedTuple):
    """What :meth:`Stacks.news` took on the loop for :meth:`Stacks.update`."""

    epoch: str
    blocks: int  # the monitor's block count then
    length: int  # the ring's length then
    first: int  # the number of events[0]
    events: tuple[BlockEvent, ...]
    more: bool  # whether more events wait after these
#: One node of the page's tree, in preorder: (depth, label, milliseconds, 1 if library code
#: else 0). Depth 0 is the root ("all"), depth 1 the requests; children follow their parent,
#: heaviest first.
Node = tuple[int, str, float, int]


def _clean(text: str) -> str:
    """Without the ``;`` that separates frames in the collapsed format, on one line."""
    return text.replace(";", ":").replace("\n", " ")


def _request(event: BlockEvent) -> str:
    if event.route == "<gc>":
        return "<garbage collector>"
    if event.route:
        return _clean(f"{event.method} {event.route}" if event.method else event.route)
    return "<no request>"


class Stacks:
    """The distinct stacks of the monitor's ring and their blocked time, kept up to date
    from one request to the next: each event is labelled once, when it is new, and its time
    taken off again when the ring drops it. Events are told apart by their number (the
    monitor's block count when they happened), the ring being first in, first out.

    On the loop, :meth:`news` picks the events not yet seen (references, O(new events)); in
    the worker thread, :meth:`update` (under :attr:`lock`) labels them and drops the events
    that left the ring. Nothing here grows with the ring per request: a request over a ring of
    100,000 events neither copies it nor makes 100,000 new objects (which would also make the
    garbage collector walk them, holding the GIL, in whichever thread allocates next).
    """

    def __init__(self) -> None:
        #: Held by the worker thread while it updates and reads :attr:`totals`.
        self.lock = threading.Lock()
        # Made once and cleared, never replaced: made with the app, they are old by the
        # time they fill up, and the collector's frequent young passes do not walk them.
        #: Distinct stack -> blocked milliseconds of the events in the ring.
        self.totals: dict[Labels, float] = {}
        self._events: dict[Labels, int] = {}  # distinct stack -> its events in the ring
        self._shared: dict[Labels, Labels] = {}  # one tuple per distinct stack
        # The ring's events, oldest first: their stacks (shared between equal ones) and
        # milliseconds, in two deques (not a deque of pairs: one object each, not 100,000).
        self._stacks: collections.deque[Labels] = collections.deque()
        self._ms: collections.deque[float] = collections.deque()
        self._library: dict[str, bool] = {}  # label -> is library code
        self._label_of: dict[tuple[str, int, str], str] = {}  # (file, line, function) -> label
        self._epoch = ""
        self._cwd = ""
        self._first = 0  # the number of the oldest event kept
        self._next = 0  # the number of the next event to label

    def _reset(self, epoch: str, cwd: str, first: int) -> None:
        for kept in (self.totals, self._events, self._shared, self._stacks, self._ms):
            kept.clear()
        if cwd != self._cwd:
            self._library.clear()
            self._label_of.clear()
        self._epoch, self._cwd = epoch, cwd
        self._first = self._next = first

    def news(self, epoch: str, count: int, ring: Any) -> News:
        """On the loop: the oldest events not yet labelled, :data:`CHUNK` at most (a
        reference each: O(CHUNK), and the ring's length to skip). Read without the lock:
        :meth:`update` skips what it has already."""
        oldest = count - len(ring)
        first = oldest if epoch != self._epoch else max(self._next, oldest)
        start = min(first - oldest, len(ring))
        events = tuple(itertools.islice(ring, start, start + CHUNK))
        return News(epoch, count, len(ring), first, events, start + CHUNK < len(ring))

    def update(self, news: News, cwd: str) -> None:
        """In the worker, holding :attr:`lock`: add the new events, drop those the ring no
        longer holds (everything when the epoch or the working directory changed)."""
        epoch, count, length, first, events, _ = news
        if epoch != self._epoch or cwd != self._cwd or first > self._next:
            # Another monitor, or events that left the ring unseen: start again from the ring.
            self._reset(epoch, cwd, first)
        shared = self._shared
        for number, event in enumerate(events, first):
            if number < self._next:  # labelled by another request meanwhile
                continue
            labels = self._labels(event, cwd)
            labels = shared.setdefault(labels, labels)
            ms = max(event.duration * 1000.0, 0.0)
            self._stacks.append(labels)
            self._ms.append(ms)
            self.totals[labels] = self.totals.get(labels, 0.0) + ms
            self._events[labels] = self._events.get(labels, 0) + 1
            self._next = number + 1
            if number % _BREATHE_EVERY == 0:
                breathe()
        oldest = count - length
        while self._first < oldest and self._stacks:
            labels, ms = self._stacks.popleft(), self._ms.popleft()
            self._first += 1
            left = self._events[labels] - 1
            if left:
                self._events[labels] = left
                self.totals[labels] -= ms
            else:  # exactly zero, not what subtracting floats would leave
                del self._events[labels], self.totals[labels], shared[labels]
        if len(self._label_of) > 4 * len(self.totals) + 10_000:
            kept = {label for labels in self.totals for label in labels}
            for key in [k for k, v in self._label_of.items() if v not in kept]:
                del self._label_of[key]
            for label in [k for k in self._library if k not in kept]:
                del self._library[label]

    def library(self, label: str) -> bool:
        return self._library.get(label, True)

    def _labels(self, event: BlockEvent, cwd: str) -> Labels:
        if not event.frames:
            status = _clean(f"<no stack: {event.stack_status}>")
            self._library[status] = True
            return (_request(event), status)
        out = [_request(event)]
        label_of = self._label_of
        for frame in reversed(event.frames):
            key = (frame.file, frame.line, frame.function)
            label = label_of.get(key)
            if label is None:
                # py-spy's frame label: function (file:line)
                label = _clean(f"{frame.function} ({short_path(frame.file, cwd)}:{frame.line})")
                label_of[key] = label
                self._library.setdefault(label, frame.is_library)
            out.append(label)
        return tuple(out)


def _from_user_code(labels: Labels, stacks: Stacks) -> Labels:
    """From the run of your own frames that ends in the innermost one (the route that
    called the blocking code): the server's and the framework's frames above it are the same
    for every request. Unchanged without a frame of your own."""
    library = stacks.library
    last = next((i for i in range(len(labels) - 1, 0, -1) if not library(labels[i])), 0)
    if not last:
        return labels
    start = last
    while start > 1 and not library(labels[start - 1]):
        start -= 1
    return (labels[0], *labels[start:])


def flame(totals: dict[Labels, float], stacks: Stacks, from_user_code: bool) -> list[Node]:
    """The aggregated tree, flat in preorder, at most :data:`MAX_NODES` nodes.

    The tree is built in flat lists of numbers, not an object per node: tens of thousands of
    containers that live through the request would soon make the garbage collector run a
    long pass, in whichever thread allocates next (the loop's included).
    """
    names: list[str] = []
    name_of: dict[str, int] = {}
    parent, name, depth, weight = [-1], [-1], [0], [0.0]
    child: dict[int, int] = {}  # (parent << 32) | name -> node
    for i, (labels, ms) in enumerate(totals.items()):
        if from_user_code:
            labels = _from_user_code(labels, stacks)
        node = 0
        weight[0] += ms
        for label in labels:
            index = name_of.get(label)
            if index is None:
                index = name_of[label] = len(names)
                names.append(label)
            key = (node << 32) | index
            nxt = child.get(key)
            if nxt is None:
                nxt = child[key] = len(parent)
                parent.append(node)
                name.append(index)
                depth.append(depth[node] + 1)
                weight.append(0.0)
            weight[nxt] += ms
            node = nxt
        if i % _BREATHE_EVERY == 0:
            breathe()
    # Keep the heaviest nodes level by level, so that what the cap cuts is the lightest.
    levels: list[list[int]] = []
    for node in range(1, len(parent)):
        while len(levels) < depth[node]:
            levels.append([])
        levels[depth[node] - 1].append(node)
    floor = weight[0] * _MIN_SHARE
    kept: dict[int, list[int]] = {0: []}
    room = MAX_NODES - 1
    for level in levels:
        level.sort(key=weight.__getitem__, reverse=True)
        for node in level:
            if room == 0:
                break
            if weight[node] >= floor and parent[node] in kept:
                kept[parent[node]].append(node)
                kept[node] = []
                room -= 1
        breathe()
    out: list[Node] = []
    todo = [0]
    while todo:
        node = todo.pop()
        label = names[name[node]] if node else "all"
        library = depth[node] > 1 and stacks.library(label)
        out.append((depth[node], label, round(weight[node], 3), 1 if library else 0))
        todo.extend(reversed(kept[node]))
    return out


def collapsed(totals: dict[Labels, float]) -> str:
    """One line per distinct stack, ``request;outer;...;inner <ms>``, heaviest first: the
    format of Brendan Gregg's stackcollapse (flamegraph.pl) that speedscope imports too.
    Whole milliseconds (both tools read integers), at least 1 per stack."""
    lines = []
    for i, labels in enumerate(sorted(totals, key=totals.__getitem__, reverse=True)):
        lines.append(f"{';'.join(labels)} {max(round(totals[labels]), 1)}\n")
        if i % _BREATHE_EVERY == 0:
            breathe()
    return "".join(lines)
