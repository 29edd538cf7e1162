import signal
import sys

import pytest

from services.clients.cluster import LocalCluster
from services.common.processes import describe_exit


@pytest.mark.parametrize(
    ("returncode", "words"),
    [
        (-signal.SIGSEGV, "killed by SIGSEGV (signal 11)"),
        (-signal.SIGKILL, "killed by SIGKILL (signal 9)"),
        (0, "exit code 0"),
        (3, "exit code 3"),
    ],
)
def test_describe_exit_names_the_signal(returncode, words):
    assert describe_exit(returncode) == words


def test_a_dead_server_is_reported_with_its_stage_signal_and_last_log_lines():
    """The report `parley up` and the demo print when a stage dies while the cluster starts."""
    cluster = LocalCluster(log=open("/dev/null", "w"))  # noqa: SIM115 - lives as long as the test
    crash = "import os, signal; print('loading the model', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    cluster.launch("translate", [sys.executable, "-c", crash])
    with pytest.raises(RuntimeError) as err:
        cluster.wait_serving("translate", timeout_s=60)
    message = str(err.value)
    assert "the translate server died (killed by SIGSEGV (signal 11))" in message
    assert "[translate] loading the model" in message
