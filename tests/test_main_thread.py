"""The tests that signal themselves skip off the main thread through one helper
(`tests.main_thread.skip_unless_main_thread`), where three modules each carried a copy of the
two-line guard."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.main_thread import SKIP_REASON, skip_unless_main_thread


def test_the_helper_skips_off_the_main_thread_and_not_on_it() -> None:
    skip_unless_main_thread()  # the main thread: nothing happens
    caught: list[BaseException] = []

    def worker() -> None:
        try:
            skip_unless_main_thread()
        except BaseException as exc:  # pytest's Skipped is a BaseException
            caught.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], pytest.skip.Exception), caught
    assert str(caught[0]) == SKIP_REASON


def test_no_test_module_carries_its_own_copy_of_the_guard() -> None:
    copies = [
        p.name
        for p in sorted(Path(__file__).parent.glob("test_*.py"))
        if p.name != Path(__file__).name and "threading.main_thread()" in p.read_text(encoding="utf-8")
    ]
    assert not copies, f"{copies}: call tests.main_thread.skip_unless_main_thread() instead"
