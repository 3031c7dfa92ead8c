"""utils.prefetch: a background-thread iterator that keeps the source's order and errors."""

import gc
import threading
import time

import pytest

from monosemantic.utils import prefetch


def test_same_items_in_order():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))


def test_error_in_source_reaches_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise KeyError("boom")

    it = prefetch(source())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(KeyError, match="boom"):
        next(it)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "monosemantic-prefetch"]


def _wait_until_gone(timeout=3.0):
    end = time.time() + timeout
    while _prefetch_threads() and time.time() < end:
        time.sleep(0.02)
    return not _prefetch_threads()


def test_close_and_garbage_collection_stop_an_endless_source():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetch(endless())
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert _wait_until_gone()
    it = prefetch(endless())
    next(it)
    del it
    gc.collect()
    assert _wait_until_gone()


def test_prefetch_reads_at_most_depth_ahead():
    made = []

    def source():
        for i in range(10):
            made.append(i)
            yield i

    it = prefetch(source(), depth=1)
    time.sleep(0.3)
    assert made == [0]  # one read ahead, no more
    assert next(it) == 0
    time.sleep(0.3)
    assert made == [0, 1]
    assert list(it) == list(range(1, 10))
    with pytest.raises(ValueError, match="depth"):
        prefetch([], depth=0)
