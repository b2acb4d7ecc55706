"""/dev/shm: how many batches may be in flight, and a configuration cut to fit.

DataLoader workers hand batches to the training process through shared-memory files; in flight
are about ``num_workers x prefetch_factor`` of them, plus the one the loop holds. Docker's default
/dev/shm is 64 MiB, and a worker that finds it full dies with "No space left on device" or a bus
error. The room is measured (free space, plus what this process and its workers already hold)
and a configuration is cut to fit it: a smaller prefetch_factor first, then fewer workers.
"""

from __future__ import annotations

import os

from loadertune.config import LoaderConfig

__all__ = ["SHM_HELD_BATCHES", "SHM_MARGIN", "SHM_PATH", "fit", "own_bytes", "room"]

#: Where DataLoader workers put the batches they hand to the training process.
SHM_PATH = "/dev/shm"
#: Share of /dev/shm the batches loadertune's loaders keep in flight may fill.
SHM_MARGIN = 0.9
#: Batches the training loop holds besides those in flight (the one it works on while the
#: next is handed over).
SHM_HELD_BATCHES = 1


def room(
    path: str, batch_bytes: int, worker_pids: list[int], in_flight_batches: int, *, enough: int | None = None
) -> tuple[int, int] | None:
    """Batches that may be in flight in ``path`` (workers x prefetch_factor), and its size.

    The room is what is free plus what this process's own batches take now (those in flight and
    the one the loop holds, at most what is used), with a margin; the loop's batch is kept out of
    it. None when ``path`` cannot be read.

    Args:
        path: The shared-memory mount.
        batch_bytes: Bytes of one collated batch.
        worker_pids: This loader's workers.
        in_flight_batches: Batches this loader holds now, for when /proc cannot tell.
        enough: Batches beyond which the exact room does not matter to the caller: when the free
            space alone holds that many, the room counted from it is returned and this process's
            own files are not looked up (that reads /proc of every worker: ~12 ms of the training
            thread a window with 8 workers).
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if enough is not None:
        lower = int(SHM_MARGIN * free // batch_bytes) - SHM_HELD_BATCHES
        if lower >= enough:
            return lower, total
    ours = own_bytes(path, worker_pids)
    if ours is None:  # no /proc: at most what our loaders can hold
        ours = (in_flight_batches + SHM_HELD_BATCHES) * batch_bytes
    capacity = free + min(max(0, total - free), ours)
    return int(SHM_MARGIN * capacity // batch_bytes) - SHM_HELD_BATCHES, total


def fit(config: LoaderConfig, batches: int) -> LoaderConfig:
    """``config`` with at most ``batches`` in flight: a smaller prefetch_factor goes first
    (workers are what a slow load needs), then fewer workers; without room for one batch,
    loading moves into the training process."""
    w, p = config.num_workers, config.prefetch_factor or 0
    if w == 0 or w * p <= batches:
        return config
    if batches < 1:
        return config.replace(num_workers=0)
    if batches >= w:
        return config.replace(prefetch_factor=batches // w)
    return config.replace(num_workers=batches, prefetch_factor=1)


def own_bytes(shm_path: str, worker_pids: list[int]) -> int | None:
    """Bytes of ``shm_path`` this process and its workers hold now: the files they map or keep
    open (a batch in transit is an open descriptor in its worker), each counted once."""
    prefix = shm_path.rstrip("/") + "/"
    sizes: dict[tuple[str, str], int] = {}
    for pid in [os.getpid(), *worker_pids]:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if prefix not in line:
                        continue
                    fields = line.split(None, 5)
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    key = (fields[3], fields[4])
                    sizes[key] = max(sizes.get(key, 0), end - start)
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            if pid == os.getpid():
                return None
            continue  # a worker that just exited
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if not os.readlink(path).startswith(prefix):
                    continue
                st = os.stat(path)
            except OSError:
                continue
            key = (f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino))
            sizes[key] = max(sizes.get(key, 0), st.st_size)
    return sum(sizes.values())
