"""What the multi-process tests share: a free TCP port for the rendezvous, and the launchers of this environment."""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest


def free_port() -> int:
    """A TCP port nobody listens on now, for `--main_process_port` / `--master_port`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(name: str) -> str:
    """`accelerate` or `torchrun` of the running Python's environment, else the one on `PATH`."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else name


def requires_launcher(name: str) -> pytest.MarkDecorator:
    """Skip a test when neither this environment nor `PATH` has the launcher `name`."""
    missing = shutil.which(name) is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), name))
    return pytest.mark.skipif(missing, reason=f"{name} CLI not installed")
