"""Engines kept up across verify runs. Every verify run gets its servers from a pool: outside a session the pool
keeps nothing (each server is started for the run and stopped after it, as always); inside a serving session
(a test run, or a tool that runs several check sets against one artifact) the pool keeps a few servers up after
their run and hands a running one to the next run that would have started the very same command. The checks
are the same either way: only when an engine starts and stops differs."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from .launch import Server


class ServerPool:
    """``with pool.serve(server) as live:`` — ``live`` is ``server`` started, or an identical one already up.
    A serving session: ``with ServerPool(keep=2) as pool, pool.active(): ...`` (every engine kept is stopped on
    the way out, an error or Ctrl-C included).

    ``keep``: how many servers may stay up between runs (0: none); the least recently used goes first, before a
    new one starts, so at most ``max(keep, 1)`` engines run at once. ``log_dir``: where the engines it starts
    write their logs (a kept server outlives the report folder of the run that started it)."""

    def __init__(self, keep: int = 0, log_dir: Path | None = None):
        self.keep = keep
        self.log_dir = log_dir
        self.idle: OrderedDict[tuple, Server] = OrderedDict()
        self.started = 0
        self.reused = 0

    @contextlib.contextmanager
    def serve(self, server: Server) -> Iterator[Server]:
        """Kept servers wait paused (SIGSTOP: no CPU) until a run takes them."""
        key = server.identity()
        live = self.idle.pop(key, None)
        if live is not None and not live.alive():
            live.stop()
            live = None
        if live is None:
            self._stop_idle(leave=max(self.keep - 1, 0))
            if self.log_dir is not None:
                server.log_path = self.log_dir / f"{self.started + 1:03d}-{server.log_path.name}"
            server.start()
            self.started += 1
            live, live.reused = server, False
        else:
            live.resume()
            self.reused += 1
            live.reused = True
            live.ready_offset = live.log_size()  # errors from here on belong to this run's requests
        kept = False
        try:
            yield live
            kept = self.keep > 0 and live.alive()
        finally:
            if kept:
                live.pause()
                self.idle[key] = live
                self._stop_idle(leave=self.keep)
            else:
                live.stop()

    def _stop_idle(self, leave: int) -> None:
        while len(self.idle) > leave:
            _, server = self.idle.popitem(last=False)
            server.stop()

    def close(self) -> None:
        """Stop every server still up."""
        self._stop_idle(leave=0)

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def active(self) -> Iterator["ServerPool"]:
        """Within the block, verify runs (in this process) get their servers from this pool."""
        global _current
        previous, _current = _current, self
        try:
            yield self
        finally:
            _current = previous


_current: ServerPool | None = None


def current_pool() -> ServerPool:
    """The active pool (ServerPool.active), else one that keeps nothing."""
    return _current if _current is not None else ServerPool()
