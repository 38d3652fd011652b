"""gpt2_book.workers: an ordered, bounded parallel map over worker processes (chapter 12)."""

import math
import multiprocessing
import os
import subprocess
import sys

import pytest

from gpt2_book.workers import cpu_count, ordered_map

# Big factorials take far longer than small ones, so workers finish out of order.
NUMBERS = [30_000, 2, 20_000, 5, 25_000, 1, 10_000, 3] * 2


def test_results_come_in_input_order_whatever_the_workers():
    expected = [math.factorial(n) for n in NUMBERS]
    for workers in (1, 2, 3):
        pairs = list(ordered_map(math.factorial, NUMBERS, workers=workers))
        assert [task for task, _ in pairs] == NUMBERS
        assert [result for _, result in pairs] == expected


def test_the_input_is_read_at_most_two_tasks_per_worker_ahead():
    drawn = []

    def tasks():
        for n in NUMBERS:
            drawn.append(n)
            yield n

    results = ordered_map(math.factorial, tasks(), workers=2)
    for i, _ in enumerate(results):
        # before result i is handed out, tasks i+1 .. i + 2 * workers may be in flight
        assert len(drawn) <= i + 1 + 2 * 2
    assert drawn == NUMBERS


def test_a_workers_error_reaches_the_caller_with_its_type():
    with pytest.raises(ValueError, match="negative"):
        list(ordered_map(math.factorial, [5, 6, -1, 7], workers=2))
    assert not multiprocessing.active_children()  # and the pool is gone


def test_stopping_early_shuts_the_pool_down():
    results = ordered_map(math.factorial, NUMBERS, workers=2)
    next(results)
    assert len(multiprocessing.active_children()) == 2  # one process per worker
    results.close()  # what `return` inside a for loop over it does
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("workers, tasks", [(1, NUMBERS), (4, [7])])
def test_one_worker_or_one_task_runs_in_this_process(workers, tasks):
    pids = [pid for _, pid in ordered_map(_pid, tasks, workers=workers)]
    assert set(pids) == {os.getpid()}
    assert not multiprocessing.active_children()


def test_several_workers_run_in_other_processes():
    pids = {pid for _, pid in ordered_map(_pid, range(8), workers=2)}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux: CPU affinity")
def test_cpu_count_is_what_this_process_may_use():
    # A process limited to one core (as taskset or a container's CPU set does) counts one.
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    code += "from gpt2_book.workers import cpu_count; print(cpu_count())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    assert cpu_count() == len(os.sched_getaffinity(0))


def _pid(_: object) -> int:
    return os.getpid()
