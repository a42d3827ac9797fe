"""``python -m monai.bundle ...`` for the tests, without paying the interpreter start each time.

Importing torch, MONAI and ignite costs seconds of CPU per process (5-10 s on this 2-core machine), and the suite
runs MONAI's runner over a hundred times. A server process (one per pytest worker, started on first use) imports
those third-party libraries once and forks a child per command; the child takes the command's working directory,
environment, argv and output files and runs ``monai.bundle`` as ``python -m`` would, then exits through the
normal interpreter shutdown (atexit handlers, flushes). The server never imports brainsynth (its import reads the
runner's command line) nor a bundle's ``scripts``, and runs nothing, so each child starts from the state of a fresh
interpreter that has imported those libraries.

Commands this cannot reproduce exactly run as real processes: another interpreter or module (torchrun, scripts),
or an environment that changes how Python starts (``PYTHONPATH`` and friends). Tests that are about a fresh
process (a fresh clone, an installed archive, README commands) call ``subprocess`` themselves.
``BRAINSYNTH_TESTS_NO_PREFORK=1`` runs every command as a real process.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

#: imported once by the server; what every bundle run imports anyway
PRELOAD = (
    "torch",
    "numpy",
    "nibabel",
    "ignite.engine",
    "monai",
    "monai.bundle",
    "monai.bundle.scripts",
    "monai.apps",
    "monai.data",
    "monai.engines",
    "monai.handlers",
    "monai.inferers",
    "monai.losses",
    "monai.metrics",
    "monai.networks.nets",
    "monai.networks.schedulers",
    "monai.transforms",
    "torch.utils.tensorboard",
)  # not brainsynth: its import reads the runner's command line (brainsynth._runner_bundle_on_path), and is cheap
#: variables read when Python starts: a command that changes them gets a real process
STARTUP_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONSAFEPATH", "PYTHONNOUSERSITE")

_server: tuple[subprocess.Popen, Connection] | None = None


def _start_server() -> tuple[subprocess.Popen, Connection]:
    import socket

    ours, theirs = socket.socketpair()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [sys.executable, __file__, str(theirs.fileno())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    conn = Connection(ours.detach())

    def stop() -> None:
        try:
            conn.send(None)
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()

    atexit.register(stop)
    return proc, conn


def _same_startup(env: dict) -> bool:
    return all(env.get(k) == os.environ.get(k) for k in STARTUP_VARIABLES)


def bundle_command(run_id: str, config_files: list, *args: str) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file [FILES] ARGS`` as a user types it."""
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr([str(c) for c in config_files]),
            *map(str, args)]  # fmt: skip


def run(cmd: list[str], cwd, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`` for
    ``[sys.executable, "-m", "monai.bundle", ...]``, forked from the server; any other command as a real process."""
    global _server
    env = dict(os.environ if env is None else env)
    forkable = cmd[:3] == [sys.executable, "-m", "monai.bundle"] and _same_startup(env)
    if not forkable or os.environ.get("BRAINSYNTH_TESTS_NO_PREFORK"):
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if _server is None or _server[0].poll() is not None:
        _server = _start_server()
    conn = _server[1]
    with tempfile.TemporaryDirectory(prefix="preforked_run_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        conn.send({"argv": cmd[2:], "cwd": str(cwd), "env": env, "stdout": out, "stderr": err})
        pid = conn.recv()
        if not conn.poll(timeout):
            os.kill(pid, 9)
            conn.recv()
            raise subprocess.TimeoutExpired(cmd, timeout, Path(out).read_text(), Path(err).read_text())
        status = conn.recv()
        return subprocess.CompletedProcess(
            cmd, status, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
        )


# --- the server and its children ---------------------------------------------------------------------------
def _child(request: dict) -> None:
    """In the forked child: become ``python -m monai.bundle ARGS`` in the request's folder and environment."""
    import runpy
    import warnings

    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("PYTHONWARNINGS"):
        warnings.resetwarnings()
        warnings._processoptions(os.environ["PYTHONWARNINGS"].split(","))  # as the interpreter does at start
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else os.cpu_count() or 1)
    sys.path.insert(0, os.getcwd())  # `python -m` puts the working folder first
    module, *args = request["argv"]
    sys.argv = [module, *args]  # argv[0] becomes the module's file, as under `python -m`
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())
        raise SystemExit(1) from None
    raise SystemExit(0)


def _serve(fd: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    del sys.path[0]  # this file's folder, which `python -m` would not have put there
    conn = Connection(fd)
    while (request := conn.recv()) is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(request)  # ends the child through SystemExit: the interpreter's normal exit
        conn.send(pid)
        _, status = os.waitpid(pid, 0)
        conn.send(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
