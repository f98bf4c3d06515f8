"""Shared by the whole suite: one torch thread in the test process, and the project's trained `tiny` checkpoint."""
import pytest
import torch

# The suite's models are tiny: two torch threads on two cores spin-wait on each other, and when another job shares
# the machine every step slows several-fold (measured on 2 shared cores: the 18 float64 SpecMoE equivalence tests
# took 80 s with torch's default of 2 threads, 12 s with 1). Cell processes that tests start set their own.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_path():
    """The trained `tiny` checkpoint: trained once per machine (about 2.5 minutes on 2 cores), then cached."""
    from workloads.train import trained_checkpoint
    return trained_checkpoint("tiny")
