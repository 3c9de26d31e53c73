"""Heavier training in a test runs on one torch thread: the suite already runs one process per core (pytest -n 2),
and a second thread in each only makes them wait on each other (a pretraining fixture took 10x longer)."""

from contextlib import contextmanager

import torch


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
