"""Shared by the whole suite: one torch thread in the test process, and the project's trained `tiny` checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The suite's models are tiny: two torch threads on two cores spin-wait on each other, and when another job shares
# the machine every step slows several-fold (measured on 2 shared cores: the 18 float64 SpecMoE equivalence tests
# took 80 s with torch's default of 2 threads, 12 s with 1). Cell processes that tests start set their own.
torch.set_num_threads(1)

TRAIN_TINY = "from workloads.train import trained_checkpoint; trained_checkpoint('tiny', progress=False)"
_trainer: subprocess.Popen | None = None


def pytest_collection_finish(session):
    """Where a collected test needs the trained `tiny`, have it trained from the start in a process of its own
    (it returns at once where it is cached): training takes one core for about 2.7 minutes, the suite runs on the
    other (one torch thread), and the first test that needs it comes minutes in (test_train.py), so an empty
    cache no longer adds the training to the suite's wall time. The fixture below waits for it on the cache's
    file lock; a training that failed there is tried again by the fixture, which then says why. Under pytest-xdist
    each worker collects: only the first (gw0) starts the trainer, so the other worker keeps its core."""
    global _trainer
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    if any("tiny_path" in getattr(item, "fixturenames", ()) for item in session.items):
        _trainer = subprocess.Popen([sys.executable, "-c", TRAIN_TINY], cwd=Path(__file__).resolve().parent.parent,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session, exitstatus):
    """A session that ended before it needed `tiny` (-x, -k) does not leave a training behind it; the next one
    clears its temporary directory (workloads.train.trained_checkpoint)."""
    if _trainer is not None and _trainer.poll() is None:
        _trainer.terminate()
        _trainer.wait()


@pytest.fixture(scope="session")
def tiny_path():
    """The trained `tiny` checkpoint: trained once per machine (about 2.7 minutes on one core), then cached."""
    from workloads.train import trained_checkpoint
    return trained_checkpoint("tiny")
