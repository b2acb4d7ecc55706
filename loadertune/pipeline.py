"""The loader pipeline: the epoch's sample stream and the DataLoaders built on it.

loadertune owns the epoch's sample stream (see :mod:`loadertune.stream`) and builds the actual
DataLoaders on it, so it can replace the loader at any batch boundary without losing or repeating
a sample. A change of workers hands over: the old loader stops taking indices and drains the
batches it has in flight while the new workers start. Anything else re-queues the in-flight
batches in front of the stream. Workers that start slowly (spawn, forkserver) are started in the
background first, the old loader serving meanwhile (see :mod:`loadertune.prestart`); when only
workers are added to a persistent loader, the new ones join the running ones instead of
replacing them (see :mod:`loadertune.group`).

The per-batch path reads ``src_it`` (the iterator to call ``next`` on) and ``src_issued`` (the
batches it was handed, oldest first), and nothing else.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from loadertune import shm
from loadertune.building import (
    build_loader,
    construct_iterator,
    make_persistent,
    start_iterator,
    torch_warnings_once,
)
from loadertune.config import LoaderConfig
from loadertune.errors import ReconfigureError
from loadertune.faults import (
    CrashTracker,
    SampleCrashError,
    crash_error,
    dead_worker_batches,
    dead_workers,
    death_report,
)
from loadertune.group import GroupIterator
from loadertune.order import EpochOrder
from loadertune.prestart import Gate, Prestart, Started, slow_start_method
from loadertune.shutdown import shutdown_loader, unregister
from loadertune.stream import EpochStream, requeue_issued

__all__ = ["LoaderPipeline", "StreamKind", "stream_kind"]

logger = logging.getLogger("loadertune")

#: How a loader makes its batches: "iterable" (an IterableDataset: its own order), "sampler"
#: (torch's BatchSampler: loadertune re-cuts the batches), "batch_sampler" (the user's own: its
#: batches are kept whole), "samples" (automatic batching off: one sample per item).
StreamKind = Literal["iterable", "sampler", "batch_sampler", "samples"]



def stream_kind(loader: DataLoader) -> StreamKind:
    """How ``loader`` makes its batches (see :data:`StreamKind`)."""
    if isinstance(loader.dataset, IterableDataset):
        return "iterable"
    if loader.batch_sampler is None:
        return "samples"
    if type(loader.batch_sampler) is BatchSampler:
        return "sampler"  # torch's own, whether the DataLoader built it or the user passed it
    return "batch_sampler"


@dataclass(frozen=True)
class _Drain:
    """An old loader handing over the batches it has in flight."""

    loader: DataLoader
    it: Iterator[Any]
    issued: deque[Any]


class LoaderPipeline:
    """Builds, switches and shuts down the DataLoaders that serve one wrapped loader.

    Args:
        loader: The user's DataLoader (never iterated itself; its options are carried over).
        dataset: The dataset the built loaders read (the user's, or a reseeding wrapper).
        config: The configuration to start with.
        key: Maps a sample index to what the dataset is indexed with (None: the index itself).

    Attributes:
        kind: How the loader makes its batches.
        config: The configuration the loaders are built with.
        pending: A change waiting for the next epoch (IterableDataset loaders only).
        src_it: The iterator the loop reads from now, None outside an epoch.
        src_issued: The batches ``src_it`` was handed and has not delivered yet.
        rebuilds: Loaders built after the first.
        last_delivered: The indices of the batch delivered last.
    """

    def __init__(
        self,
        loader: DataLoader,
        *,
        dataset: Any,
        config: LoaderConfig,
        key: Callable[[int], Any] | None = None,
    ) -> None:
        self.loader = loader
        self.kind: StreamKind = stream_kind(loader)
        self._dataset = dataset
        self._key = key
        self._initial = config
        self.config = config
        # A BatchSampler passed in (batch_size=None on the loader) holds the batch settings.
        self.drop_last = loader.batch_sampler.drop_last if self.kind == "sampler" else loader.drop_last
        self.pending: LoaderConfig | None = None
        #: The ``worker_init_fn`` of the loaders it builds (the user's, or the stall watch's
        #: wrapper around it).
        self.worker_init_fn: Callable[[int], Any] | None = loader.worker_init_fn
        #: The run's ``distributed.Collective`` (None outside torch.distributed): workers fork
        #: inside its ``fork_guard``.
        self.collective: Any = None
        self.src_it: Iterator[Any] | None = None
        self.src_issued: deque[Any] | None = None
        self.rebuilds = 0
        self.last_delivered: Any = None
        self._inner: DataLoader | None = None
        self._it: Iterator[Any] | None = None
        self._stream: EpochStream | None = None
        self._drain: _Drain | None = None
        #: Loaders whose workers were added beside ``_inner``'s (see :mod:`loadertune.group`),
        #: and the log of which of them drew each batch in flight (None without a group).
        self._added: list[DataLoader] = []
        self._log: deque[int] | None = None
        #: A rebuild's loader whose workers are starting in the background, None when none is.
        self.starting: Prestart | None = None
        #: The configuration of the last background start given up, and why (see
        #: :meth:`abort_prestart`); the front end reports and clears it.
        self.abandoned: tuple[LoaderConfig, str] | None = None
        self._stopping: list[Prestart] = []
        #: Each epoch's order and the RNG states it comes from (an IterableDataset has its own
        #: order: only the built loaders' generator is used).
        self.order = EpochOrder(loader, self.kind, config)
        #: Bytes of one collated batch (set by the front end once measured): bounds /dev/shm use.
        self.batch_bytes: int | None = None
        self.shm_path = shm.SHM_PATH
        #: Samples dead workers were loading (a second death on one of them is deterministic).
        self.crashes = CrashTracker()
        # The batch last delivered when a cut-short loader was replaced (no progress since: stop).
        self._resumed_at: Any = _NOTHING

    @property
    def in_epoch(self) -> bool:
        """Whether an epoch is being served (map-style loaders)."""
        return self._stream is not None

    @property
    def stream(self) -> EpochStream | None:
        """The epoch's sample stream, None outside an epoch or for an IterableDataset."""
        return self._stream

    @property
    def draining(self) -> bool:
        """Whether an old loader is still handing over its in-flight batches."""
        return self._drain is not None

    # -- epochs ------------------------------------------------------------------------------------
    def start_epoch(self) -> bool:
        """Starts serving an epoch; returns whether a change waiting for it was made."""
        if self.src_it is not None:
            # The previous epoch was left early: its in-flight batches are simply dropped, as a
            # fresh DataLoader iterator would drop them.
            self._discard_epoch()
        self.crashes.reset()
        switched = False
        if self.pending is not None:
            self.switch(self.pending)
            self.pending = None
            switched = True
        if self.kind == "iterable":
            if self._inner is None:
                self._inner = self._build(None)
            self._it = start_iterator(self._inner, self.collective)
        else:
            source = self.order.begin()
            self._stream = EpochStream(source, drawn=self.order.start.position)
            if self._inner is None or not self.config.persistent_workers or self.config.num_workers == 0:
                self._shutdown_inner()
                self._inner = self._build(self._stream)
            else:
                for loader in (self._inner, *self._added):
                    self._sampler_of(loader).stream = self._stream
                self._inner_sampler().issued.clear()  # shared by a group's loaders
            if self.starting is not None:
                # Carried over from the last epoch (persistent workers serve this one too): the
                # new loader draws from this epoch's stream once it takes over.
                self._sampler_of(self.starting.loader).stream = self._stream
            if self._added:
                self._log.clear()
                loaders = [self._inner, *self._added]
                self._it = GroupIterator([(lo, start_iterator(lo, self.collective)) for lo in loaders], self._log)
            else:
                self._it = start_iterator(self._inner, self.collective)
        self._point()
        return switched

    def end_epoch(self) -> None:
        """The epoch's last batch was delivered."""
        if not self.config.persistent_workers:
            self._it = None
        self._stream = None
        self.src_it = self.src_issued = None

    def _discard_epoch(self) -> None:
        self.abort_prestart("the epoch was left before they had started")
        self._shutdown_drain()
        if self.config.persistent_workers and self.config.num_workers > 0 and self._inner is not None:
            # torch's _reset drains a persistent iterator's in-flight batches itself.
            self._inner_sampler().issued.clear()
            if self._log is not None:
                self._log.clear()
        else:
            self._shutdown_inner()
        self._stream = None
        self.src_it = self.src_issued = None

    def position(self) -> int:
        """Items of this epoch's sampler the loop has consumed (in-flight ones do not count):
        indices, or whole batches of a user's batch_sampler; 0 outside an epoch."""
        stream = self._stream
        if stream is None:
            return 0
        in_flight = 0
        for issued in self._issued_lists():
            in_flight += sum(map(len, issued)) if self.kind == "sampler" else len(issued)
        return stream.drawn - stream.requeued - in_flight

    # -- the per-batch bookkeeping -----------------------------------------------------------------
    def delivered(self) -> int | None:
        """Takes the batch just delivered off the issued list; returns its sample count (None
        when unknown: an IterableDataset)."""
        issued = self.src_issued
        if not issued:
            return None
        consumed = issued.popleft()
        self.last_delivered = consumed
        if self.crashes.suspects:
            self.crashes.delivered(consumed)
        return len(consumed) if self.kind != "samples" else 1

    def drop_failed(self) -> None:
        """Forgets the batch whose loading raised (torch drops it too)."""
        if self.src_issued:
            self.src_issued.popleft()

    def finish_drain(self) -> bool:
        """Moves on from a drained old loader; False when no hand-over was under way."""
        if self._drain is None:
            return False
        self._shutdown_drain()
        self._point()
        return True

    # -- changes -----------------------------------------------------------------------------------
    def switch(self, config: LoaderConfig) -> None:
        """Switches configuration between epochs (no stream to carry over)."""
        self._shutdown_inner()
        self.config = config
        self.rebuilds += 1

    def rebuild(self, config: LoaderConfig, *, handoff_ok: bool = True) -> int:
        """Switches configuration mid-epoch at the current batch boundary.

        Returns:
            The batches still in flight in a loader handing over (they are delivered before the
            new loader's first).

        An interrupt (KeyboardInterrupt, SystemExit) anywhere in it reaches the caller after
        every loader of the epoch is stopped; the rest of that epoch then refuses (every
        ``next`` raises, naming the interrupt) and the next epoch starts clean.
        """
        try:
            return self._rebuild(config, handoff_ok)
        except Exception:
            raise
        except BaseException as exc:
            self._interrupted(exc)
            raise

    def _interrupted(self, exc: BaseException) -> None:
        """Stops every loader after an interrupt part-way through a rebuild: which samples are
        in flight, re-queued or lost is then unknown, so the epoch is not served any further."""
        try:
            self._shutdown_inner()
        finally:
            self._it = _Failed(
                None,
                f"this epoch was interrupted ({type(exc).__name__}) while loadertune was rebuilding "
                "its DataLoader, so which samples were already served is unknown; start a new "
                "epoch with iter(), or resume from a state_dict() taken before",
            )
            self._point()

    def persist_in_place(self, config: LoaderConfig) -> bool:
        """Switches to ``config`` without a rebuild when it only turns persistent_workers on
        for the loader running now (its workers are kept: no stall); False when it does not."""
        if not self._keep_alive(config):
            return False
        self.config = config
        self.rebuilds += 1
        return True

    def _rebuild(self, config: LoaderConfig, handoff_ok: bool) -> int:
        if self.persist_in_place(config):
            return 0
        stream = self._stream
        # Built (not started) first: a configuration torch refuses raises here, with the old
        # loader still serving the epoch.
        new = self._build(stream, config) if stream is not None else None
        in_flight = self._hand_over(config, handoff_ok)
        self.config = config
        self.rebuilds += 1
        if stream is not None:
            # Even an exhausted stream gets a loader: it ends the epoch as the old one would have.
            self._inner = new
            try:
                self._it = start_iterator(new, self.collective)
            except BaseException as exc:
                # The epoch cannot go on without a loader: every later next() says why, so it
                # never ends early in silence.
                self._it = _Failed(exc)
                self._point()
                raise
        self._point()
        return in_flight

    def _hand_over(self, config: LoaderConfig, handoff_ok: bool) -> int:
        """Stops the current loader drawing from the stream: at the same batch size its
        in-flight batches are delivered first (returns how many), else they go back to the
        stream and it stops now."""
        stream = self._stream
        handoff = (
            handoff_ok
            and stream is not None
            and self._drain is None
            and self._it is not None
            and self.config.num_workers > 0
            and config.batch_size == self.config.batch_size
            and bool(self.src_issued)
        )
        if handoff:
            for loader in (self._inner, *self._added):
                self._sampler_of(loader).closed = True
            issued = self._inner_sampler().issued
            # A group drains as one: its iterator reads each loader's batches in draw order.
            self._drain = _Drain(self._inner, self._it, issued)
            self._inner = self._it = None
            self._added, self._log = [], None
            return len(issued)
        if stream is not None:
            requeue_issued(stream, self._issued_lists(), flatten=self.kind == "sampler")
        self._shutdown_inner()
        return 0

    # -- workers started in the background (spawn, forkserver) ------------------------------------
    def prestart(self, config: LoaderConfig) -> bool:
        """Starts the workers of a rebuild at ``config`` in the background while the current
        loader goes on serving (see :mod:`loadertune.prestart`); False when the rebuild should
        happen now instead (fast-starting workers, no epoch under way, torch.distributed, a
        batch-size change: the learning rate follows the batch it is planned for).

        Raises:
            ValueError: torch refuses the configuration (nothing changed).
        """
        stream, c = self._stream, self.config
        if (
            self.starting is not None
            or stream is None
            or self._drain is not None
            or self._it is None
            or isinstance(self._it, _Failed)
            or self.collective is not None
            or config.num_workers == 0
            or config.batch_size != c.batch_size
            or config == c.replace(persistent_workers=True)
            or slow_start_method(self.loader) is None
        ):
            return False
        ctx = self.loader.multiprocessing_context or multiprocessing.get_context()
        semaphore = ctx.Semaphore(0)
        # Only workers added to a persistent loader: the new ones join the running ones.
        base = c if self.joins(config) else None
        built = config if base is None else config.replace(num_workers=config.num_workers - c.num_workers)
        new = self._build(stream, built, worker_init_fn=Started(self.worker_init_fn, semaphore))
        with torch_warnings_once():
            new.check_worker_number_rationality()
        if new.pin_memory and not torch.accelerator.is_available():
            # torch turns pinning off itself here, but warns at every iterator it builds: on the
            # background thread that warning cannot be caught (catching there would catch the
            # training thread's too), and it was shown once already.
            new.pin_memory = False
        gate = Gate()
        self._sampler_of(new).gate = gate
        self.starting = Prestart(new, config, gate, semaphore, construct_iterator, base=base)
        return True

    def joins(self, config: LoaderConfig) -> bool:
        """Whether ``config`` only adds workers to the persistent loader running now, so that the
        new workers can serve beside the running ones (see :mod:`loadertune.group`)."""
        c = self.config
        return bool(
            c.persistent_workers
            and c.num_workers > 0
            and config.num_workers > c.num_workers
            and config == c.replace(num_workers=config.num_workers)
            and self._drain is None
            and self._inner is not None
            and (self._added or hasattr(self._it, "_workers"))
            # Out of order, a batch whose loading raised cannot be told from one still to come:
            # the group's log would lose its place.
            and getattr(self.loader, "in_order", True)
        )

    def finish_prestart(self) -> int:
        """Switches to the loader whose workers started in the background, at this batch
        boundary; returns the old loader's batches in flight (delivered first). Workers added
        to the running ones join them instead (nothing handed over: returns 0). Should the
        started iterator not come (its thread failed at the last moment), a loader at the new
        configuration is started here instead, as a rebuild would."""
        pre, self.starting = self.starting, None
        if pre is None:
            raise ReconfigureError("no DataLoader is starting in the background")
        if pre.base is not None:
            if pre.base == self.config and self.joins(pre.config):
                try:
                    self._join(pre)
                    return 0
                except RuntimeError:
                    logger.warning("the workers started in the background could not join the running ones; starting them all now")
                    # What it drew, if anything, sits in the shared lists: all goes back to the
                    # stream (handoff_ok=False), none of it left to a loader that will not serve.
                    self._sampler_of(pre.loader).closed = True
                    self._stopping = [p for p in self._stopping if p.alive] + [pre]
                    return self.rebuild(pre.config, handoff_ok=False)
            pre.abort()
            self._stopping = [p for p in self._stopping if p.alive] + [pre]
            return self.rebuild(pre.config)
        try:
            in_flight = self._hand_over(pre.config, True)
        except BaseException as exc:
            # Interrupted while stopping the old loader: nothing more of this epoch is served.
            pre.abort()
            self._interrupted(exc)
            raise
        self.config = pre.config
        self.rebuilds += 1
        try:
            self._inner, self._it = pre.loader, pre.finish()
        except RuntimeError:
            logger.warning("the loader started in the background could not take over; starting it now")
            new = self._build(self._stream, pre.config)
            self._inner = new
            try:
                self._it = start_iterator(new, self.collective)
            except BaseException as exc:
                self._it = _Failed(None, f"the DataLoader for the rest of this epoch could not be started: {exc!r}")
                self._point()
                raise
        if self._inner.persistent_workers:
            self._inner._iterator = self._it  # as iter() keeps a persistent loader's iterator
        self._point()
        return in_flight

    def _join(self, pre: Prestart) -> None:
        """Adds the loader whose workers started in the background beside the running one(s):
        from this batch on both draw from the stream, read in the order they drew.

        Raises:
            RuntimeError: Its iterator could not be started (nothing changed).
        """
        first = self._inner_sampler()
        log = self._log if self._log is not None else deque([0] * len(first.issued))
        new = self._sampler_of(pre.loader)
        # Read by its sampler once the gate opens: its first draws land in the shared lists.
        new.issued, new.log, new.tag = first.issued, log, len(self._added) + 1
        it = pre.finish()
        first.log = log
        parts = self._it.parts if isinstance(self._it, GroupIterator) else [(self._inner, self._it)]
        pre.loader._iterator = it  # as iter() keeps a persistent loader's iterator
        self._it = GroupIterator([*parts, (pre.loader, it)], log)
        self._added.append(pre.loader)
        self._log = log
        self.config = pre.config
        self.rebuilds += 1
        self._point()

    def abort_prestart(self, why: str, *, wait: bool = False) -> None:
        """Abandons workers starting in the background (the current loader goes on); ``why``
        is kept in ``abandoned`` for the front end to report. ``wait`` for their thread."""
        pre, self.starting = self.starting, None
        if pre is not None:
            self.abandoned = (pre.config, why)
            pre.abort(wait=wait)
            if not wait:
                # close() waits for its thread to stop its workers.
                self._stopping = [p for p in self._stopping if p.alive] + [pre]

    def _keep_alive(self, config: LoaderConfig) -> bool:
        """Turns persistent_workers on for the loader running now, in place, when that is the
        only change: torch's iterator then keeps its workers at the epoch's end, and the next
        epoch resets it instead of starting workers again."""
        c, inner, it = self.config, self._inner, self._it
        if not (
            config == c.replace(persistent_workers=True)
            and not c.persistent_workers
            and c.num_workers > 0
            and self._drain is None
            and inner is not None
            and it is not None
            and self.kind != "iterable"
        ):
            return False
        return make_persistent(inner, it)

    def requeue_front(self, items: Any) -> None:
        """Hands ``items`` (a failed batch's indices) out again first, then what is in flight."""
        stream = self._stream
        if stream is None:
            raise ReconfigureError("no epoch in progress to hand the failed batch back to")
        requeue_issued(stream, self._issued_lists(), flatten=True)
        stream.requeue(items)

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (the current loader's and a draining one's)."""
        its = [self._it] + ([self._drain.it] if self._drain is not None else [])
        return [w.pid for it in its for w in (getattr(it, "_workers", None) or []) if w.pid is not None]

    # -- /dev/shm ----------------------------------------------------------------------------------
    def shm_room(self, *, enough: int | None = None) -> tuple[int, int] | None:
        """Batches that may be in flight in /dev/shm, and its size (see :func:`loadertune.shm.room`,
        also for ``enough``); None while the batch size in bytes is unknown or /dev/shm cannot be
        read."""
        if not self.batch_bytes:
            return None
        return shm.room(self.shm_path, self.batch_bytes, self.worker_pids(), self._in_flight_batches(), enough=enough)

    def _in_flight_batches(self) -> int:
        n = 0
        if self._it is not None and not isinstance(self._it, _Failed):
            n += self.config.num_workers * (self.config.prefetch_factor or 0)
        if self._drain is not None:
            n += len(self._drain.issued)
        return n

    # -- worker deaths -----------------------------------------------------------------------------
    def note_death(self, it: Any, exc: BaseException) -> list[Any]:
        """Records what a dead worker of ``it`` was loading; returns the samples a worker already
        died on (a deterministic crash), else an empty list."""
        issued = list(self.src_issued) if it is self.src_it and self.src_issued is not None else []
        batches = None
        if isinstance(it, GroupIterator):
            # torch's bookkeeping is each loader's own: read in the loader whose worker died.
            batches = [
                batch
                for part, share in it.split(issued)
                if dead_workers(part, exc)
                for batch in dead_worker_batches(part, exc, share)
            ]
        if not batches:
            batches = dead_worker_batches(it, exc, issued)
        return self.crashes.death(batches, death_report(it, exc))

    def crash_error(self, exc: BaseException, samples: list[Any]) -> SampleCrashError:
        """Stops the epoch after a deterministic crash; returns the error naming the sample.

        The suspects are loaded one by one in throwaway workers to single out the culprit;
        none of them is ever loaded in the training process.
        """
        self._shutdown_inner()
        stream = self._stream
        self._stream = None
        del stream
        loader = self.loader
        error = crash_error(
            self._dataset,
            samples,
            self.crashes.deaths,
            key=self._key,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
        )
        self._it = self.src_it = _Failed(error)
        self.src_issued = None
        return error

    def resume_unfinished(self) -> bool:
        """At a loader's end of iteration: whether samples of the epoch are still unserved.

        A loader whose sampler was cut short (an exception raised into it) ends before the
        epoch does; a new loader then serves the rest, so the epoch never ends early in
        silence. Returns False at the real end of the epoch.

        Raises:
            RuntimeError: A fresh loader ended again with samples left.
        """
        stream = self._stream
        if stream is None or isinstance(self._it, _Failed):
            return False
        left = stream.requeued
        if self.kind == "sampler" and self.drop_last and stream.exhausted:
            left = 0 if left < (self.config.batch_size or 1) else left
        if stream.exhausted and not left:
            return False
        if self._resumed_at is self.last_delivered:
            raise RuntimeError(
                f"the epoch's loader ended with samples left ({left or 'the sampler not exhausted'}) "
                "twice in a row; stopping rather than ending the epoch short"
            )
        self._resumed_at = self.last_delivered
        self.rebuild(self.config, handoff_ok=False)
        return True

    def shutdown(self) -> None:
        """Stops every worker now; idempotent."""
        self.abort_prestart("the loader was closed", wait=True)
        self._shutdown_inner()
        stopping, self._stopping = self._stopping, []
        for pre in stopping:
            pre.join()
        self._stream = None

    # -- building ----------------------------------------------------------------------------------
    def _build(
        self, stream: EpochStream | None, config: LoaderConfig | None = None, *, worker_init_fn: Any = None
    ) -> DataLoader:
        return build_loader(
            self.loader,
            self._dataset,
            stream,
            config or self.config,
            kind=self.kind,
            drop_last=self.drop_last,
            key=self._key,
            worker_init_fn=worker_init_fn or self.worker_init_fn,
            generator=self.order.generator,
        )

    def _point(self) -> None:
        """Points the per-batch path at the draining loader, else at the current one."""
        if self._drain is not None:
            self.src_it, self.src_issued = self._drain.it, self._drain.issued
        else:
            self.src_it = self._it
            self.src_issued = None if self._stream is None or self._inner is None else self._inner_sampler().issued

    def _inner_sampler(self) -> Any:
        return self._sampler_of(self._inner)

    def _sampler_of(self, loader: Any) -> Any:
        return loader.sampler if self.kind == "samples" else loader.batch_sampler

    def _issued_lists(self) -> list[deque[Any]]:
        """Issued-but-undelivered batches of every live loader, oldest loader first."""
        out = []
        if self._drain is not None:
            out.append(self._drain.issued)
        if self._inner is not None and self._stream is not None:
            out.append(self._inner_sampler().issued)
        return out

    def _shutdown_inner(self) -> None:
        self.abort_prestart("the running loader was replaced")
        self._shutdown_drain()
        if self._added and not isinstance(self._it, GroupIterator):
            # The group's iterator was lost (a failed start): stop each added loader's own.
            for loader in self._added:
                _shutdown(loader, getattr(loader, "_iterator", None))
        _shutdown(self._inner, self._it)
        self._it = None
        self._inner = None
        self._added, self._log = [], None
        self.src_it = self.src_issued = None

    def _shutdown_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            _shutdown(drain.loader, drain.it)


def _shutdown(loader: DataLoader | None, it: Any) -> None:
    """Stops a loader's workers now (a persistent loader keeps its iterator on the loader); a
    worker's abnormal exit while it stops is logged, never raised (see :mod:`loadertune.shutdown`)."""
    if isinstance(it, _Failed):
        it = None
    if isinstance(it, GroupIterator):
        # Every part off torch's SIGCHLD check first: a worker of one part that dies while
        # another part stops would otherwise be reported as the death of a worker still in use.
        for _, part_it in it.parts:
            unregister(part_it)
        for part, part_it in it.parts:
            shutdown_loader(part, part_it)
        return
    shutdown_loader(loader, it)


_NOTHING = object()


class _Failed:
    """Stands in for an iterator that could not be started: every ``next`` raises why.

    With a ``message`` it keeps no exception (whose traceback would keep the stopped iterator
    and its queues' file descriptors alive)."""

    def __init__(self, exc: BaseException | None, message: str | None = None) -> None:
        self.exc = exc
        self.message = message

    def __iter__(self) -> _Failed:
        return self

    def __next__(self) -> Any:
        if self.message is not None:
            raise RuntimeError(self.message)
        raise RuntimeError(f"the DataLoader for the rest of this epoch could not be started: {self.exc!r}") from self.exc
