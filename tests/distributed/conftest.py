from datetime import timedelta

import pytest

from nemo_plrd.parallel import init_distributed


@pytest.fixture(scope="session", autouse=True)
def process_group() -> None:
    """The torchrun group, its collectives bounded at 5 minutes instead of torch's 30: a test
    that splits the ranks (one raising, one waiting in a collective) fails in minutes. No
    test here makes a rank wait on another for more than seconds."""
    init_distributed(timeout=timedelta(minutes=5))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A `-k` that selects no TP test is no failure (as in the other lanes): torchrun would report
    pytest's exit code 5 as failed ranks."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
