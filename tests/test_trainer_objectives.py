"""The Trainer's pieces on their own: the objective registry, the global-batch draws, stop requests."""

import os
import signal

import pytest
import torch

from ddpm_cli.engine.choices import TASKS
from ddpm_cli.engine.runtime.distributed import World
from ddpm_cli.training.objectives import OBJECTIVES, Draws, Objective, objective_class
from ddpm_cli.training.stop import StopRequests


def test_every_task_has_an_objective_registered_by_its_name():
    assert set(OBJECTIVES) == set(TASKS)
    for name, cls in OBJECTIVES.items():
        assert issubclass(cls, Objective) and cls.name == name and objective_class(name) is cls


def test_each_process_draws_its_rows_of_the_global_batch():
    """Two processes of 2 rows each draw what one process draws for the global batch of 4."""
    def draws(world):
        return Draws(torch.Generator().manual_seed(3), torch.device("cpu"), world)

    one = draws(World())
    t_all, noise_all = one.timesteps(4, 1000), one.normal((4, 1, 4, 4))
    for rank in range(2):
        mine = draws(World(rank, 2))
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(mine.timesteps(2, 1000), t_all[rows])
        assert torch.equal(mine.normal((2, 1, 4, 4)), noise_all[rows])
    assert not torch.equal(noise_all[:2], noise_all[2:])


@pytest.fixture
def sigint_default():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_first_signal_is_a_request_and_a_second_quits_at_once(sigint_default):
    stop = StopRequests(World(), torch.device("cpu"))
    with stop:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_under_torchrun_a_forwarded_repeat_is_the_same_request(sigint_default):
    stop = StopRequests(World(0, 2), torch.device("cpu"))
    with stop:
        os.kill(os.getpid(), signal.SIGINT)  # from the terminal
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's agent forwarding it
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests(World(), torch.device("cpu")):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
