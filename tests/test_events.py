from __future__ import annotations

import json
import logging

import pytest

from loadertune.config import LoaderConfig
from loadertune.events import EVENT_KINDS, EventLog, read_events


def test_events_go_to_memory_file_and_sinks(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = []
    log = EventLog(path, sinks=(seen.append,))
    log.emit("start", 0, 0, config=LoaderConfig(num_workers=2, batch_size=8))
    log.emit("window", 10, 0, metrics={"samples_per_s": 12.5})
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["kind"] for e in lines] == ["start", "window"]
    assert lines[0]["config"]["num_workers"] == 2  # objects with to_dict() serialise
    assert lines[1]["step"] == 10 and lines[1]["metrics"]["samples_per_s"] == 12.5
    assert [e.kind for e in seen] == ["start", "window"] and len(log.events) == 2
    assert read_events(path) == lines


def test_a_broken_sink_is_logged_not_raised(caplog):
    def broken(_event):
        raise RuntimeError("sink down")

    log = EventLog(sinks=(broken,))
    with caplog.at_level(logging.WARNING, "loadertune"):
        log.emit("fault", 1, 0)
    assert "event sink" in caplog.text and len(log.events) == 1


def test_memory_is_bounded():
    log = EventLog(maxlen=3)
    for i in range(10):
        log.emit("window", i, 0)
    assert [e.step for e in log.events] == [7, 8, 9]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        EventLog(tmp_path / "missing" / "run.jsonl")
    with pytest.raises(ValueError, match="callables"):
        EventLog(sinks=("not callable",))


def test_read_events_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"kind": "start"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        read_events(path)
    path.write_text('{"no": "kind"}\n')
    with pytest.raises(ValueError, match="not a loadertune event"):
        read_events(path)


def test_kinds_are_declared():
    assert "summary" in EVENT_KINDS and len(set(EVENT_KINDS)) == len(EVENT_KINDS)
