"""A preloaded interpreter for local CPU jobs: the ML stack imported once per workflow run, each job forked.

Every rule script starts a fresh Python, and the ones that train or evaluate import torch, transformers, peft
and bitsandbytes first: about 3 s of CPU per job, a third of the default study's overhead on a 2-core machine.
With local execution on a machine without GPUs, the Snakefile starts one server (`serve`) that imports them once
and stops it when the workflow ends. A rule script's `job()` then hands its whole run to a child the server
forks (`hand_over`): the same script file, arguments, environment, working directory, stdin, stdout and stderr.
The script's process waits, forwards the signals it gets, and exits with the child's status; a child whose
script process was killed outright (SIGKILL) is killed too. A job that cannot be handed over runs in its own
process as before: no server, another interpreter or checkout (`--sdm conda`), a SLURM job, or an environment
variable that the preloaded libraries read at import differing from the server's.

Only without GPUs: a GPU job must claim its device before anything initialises CUDA, and importing the stack
already queries the devices (lora_study.core.gpu_slots); a forked child cannot use CUDA its parent started.
Snakemake's `benchmark:` record of a handed-over job measures the waiting script process: its wall time is the
job's, its memory and CPU columns are not (the job's own metrics record its peak memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Set by the Snakefile for its jobs: the server's socket.
SOCKET_VARIABLE = "LORA_STUDY_PRELOAD_SOCKET"
# Set by the Snakefile beside the socket: the server's pid (a job waits for a server that is still importing).
PID_VARIABLE = "LORA_STUDY_PRELOAD_PID"
# Set in a forked child: the job runs here, hand nothing over again.
CHILD_VARIABLE = "LORA_STUDY_PRELOADED"
# The script process's age when it handed over (the job's "start" phase: interpreter and Snakemake's preamble).
HANDED_AGE_VARIABLE = "LORA_STUDY_HANDED_OVER_AGE_S"

# What the server imports: everything heavy the train, evaluate, deploy, downstream and plan jobs import.
PRELOADED_MODULES = (
    "torch",
    "snakemake.script",
    "transformers",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.modeling_layers",
    "transformers.activations",
    "transformers.models.auto.modeling_auto",
    "bitsandbytes",
    "peft",
    "datasets",
    "safetensors.torch",
    "lora_study.training.loop",
    "lora_study.measure.evaluate",
)

# Environment variables the libraries read when imported (CPU dispatch, thread pools, allocators, caches, the
# interpreter's own): a job whose value differs runs in its own process. Thread counts are applied in the
# child instead (THREAD_VARIABLES), and CUDA_VISIBLE_DEVICES is read at CUDA's start, which a child never has.
WATCHED_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "PYTORCH_", "TORCH", "HF_", "TRANSFORMERS_", "BNB_", "BITSANDBYTES",
                    "PYTHON", "LD_", "KMP_", "GOMP_", "MKL_", "OMP_", "TOKENIZERS_", "CUDA_")  # fmt: skip
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
UNWATCHED = (*THREAD_VARIABLES, "CUDA_VISIBLE_DEVICES")

# Set before the imports, in the server and in every job (lora_study.core.jobs): the libraries read them then.
QUIET_DEFAULTS = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

# Rules whose scripts import the ML stack; the server is started only when at least two such jobs will run.
PRELOADED_RULES = ("train", "evaluate", "deploy", "downstream", "plan", "layout")

MESSAGE_BYTES = 1 << 20
# How long a job waits for a server that is still importing. Every job of a study then runs the same way, which
# matters on CPU: a forked job's resident set lacks the library pages the server mapped but the job never
# touched (about 0.1 GB less peak RSS for a training job than in its own interpreter).
SERVER_START_WAIT_S = 120.0


def watched_environment(environment: dict[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environment.items()
        if name.startswith(WATCHED_PREFIXES) and name not in UNWATCHED
    }


def gpus_present() -> bool:
    """Whether this machine has NVIDIA devices, read from the driver's files (nothing that starts CUDA)."""
    listed = Path("/proc/driver/nvidia/gpus")
    return (listed.is_dir() and any(listed.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def reason_not_to_start(enabled: bool, device: str, local: bool, isolated_envs: bool, stack_jobs: int) -> str | None:
    """Why this workflow run does without the server (None: start it)."""
    if not enabled:
        return "execution.preload is false"
    if not local:
        return "jobs run under a cluster executor, each in its own allocation"
    if isolated_envs:
        return "jobs run in their own software environments (--sdm)"
    if device != "cpu" and gpus_present():
        return "GPUs are present: a GPU job claims its device before anything may start CUDA"
    if stack_jobs < 2:
        return f"{stack_jobs} job(s) that import the ML stack"
    return None


def import_environment(environment: dict[str, str]) -> dict[str, str]:
    """The watched variables a job's imports would see: its environment with job()'s defaults."""
    return watched_environment({**QUIET_DEFAULTS, **environment})


def refusal(request: dict[str, Any], served_environment: dict[str, str]) -> str | None:
    """Why this server cannot run the job `request` describes, or None. `served_environment`: the server's
    environment before its imports (which set some variables themselves, e.g. torch's inductor cache)."""
    import lora_study

    if request["executable"] != sys.executable:
        return f"the job's interpreter {request['executable']} is not the server's {sys.executable}"
    if request["package"] != str(Path(lora_study.__file__).resolve().parent):
        return f"the job imports lora_study from {request['package']}, the server from another checkout"
    mine, theirs = import_environment(served_environment), import_environment(request["env"])
    if differing := sorted(set(mine.items()) ^ set(theirs.items())):
        return f"environment variables read at import differ: {sorted({name for name, _ in differing})}"
    return None


def serve(socket_path: Path, parent_pid: int) -> None:
    """Import the stack, then fork a child per job request until the workflow (`parent_pid`) is gone."""
    served_environment = dict(os.environ)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # serves CPU jobs only; nothing here may start CUDA
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import importlib

    started = time.perf_counter()
    for module in PRELOADED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:  # an optional library not installed: jobs import what they have
            print(f"preload: {module} not imported ({error})", file=sys.stderr)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(socket_path))
    listener.listen(64)
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-job monitors are reaped by the kernel
    print(f"preload: serving on {socket_path} after {time.perf_counter() - started:.1f} s of imports", flush=True)
    while os.getppid() == parent_pid:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                monitor(connection, served_environment)
            except BaseException as error:  # a monitor must never return into the server loop
                print(f"preload: monitor failed: {error!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        connection.close()


def peer_uid(connection: socket.socket) -> int:
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def send(connection: socket.socket, message: dict[str, Any]) -> None:
    connection.send(json.dumps(message).encode())


def monitor(connection: socket.socket, served_environment: dict[str, str]) -> None:
    """One job: check it, fork its child, report the child's pid and exit status; forward the signals the script
    process sends; stop the child when the script process is gone."""
    payload, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 3)
    request = json.loads(payload)
    if peer_uid(connection) != os.getuid():
        send(connection, {"refused": "another user's process"})
        return
    if reason := refusal(request, served_environment):
        send(connection, {"refused": reason})
        return
    child = os.fork()
    if child == 0:
        connection.close()
        run_job(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    try:
        send(connection, {"pid": child})
        watch(child, connection)
    except BaseException:  # a job nobody waits for must not go on writing outputs
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise


def watch(child: int, connection: socket.socket) -> None:
    """Report the child's exit status to the script process, forward its signals, and kill the child when the
    script process was killed outright."""
    try:
        exited: Any = os.pidfd_open(child)  # readable once the child exits (Linux 5.3)
        poll_s = None
    except (AttributeError, OSError):
        exited, poll_s = None, 0.05  # an older kernel: look every 50 ms
    while True:
        ready, _, _ = select.select([connection] + ([exited] if exited is not None else []), [], [], poll_s)
        done, status = os.waitpid(child, os.WNOHANG) if exited is None or exited in ready else (0, 0)
        if done:
            with contextlib.suppress(OSError):  # the script process may be gone by now: nothing left to tell
                send(connection, {"status": status})
            return
        if connection not in ready:
            continue
        message = connection.recv(MESSAGE_BYTES)
        if not message:  # the script process was killed outright: so is the job, as if it were that process
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return
        os.kill(child, json.loads(message)["signal"])


def run_job(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the job's process and run its script; exit with its status."""
    import atexit
    import runpy
    import traceback

    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD_VARIABLE] = "1"
    os.environ[HANDED_AGE_VARIABLE] = str(request["age_s"])
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    import tempfile

    tempfile.tempdir = None  # read TMPDIR again: Snakemake sets the job's own
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))  # what a fresh process would start with
    code = 0
    try:
        runpy.run_path(request["argv"][0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:  # sys.exit("message"): printed, status 1
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # what an uncaught exception does in a fresh interpreter
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def handed_over_age_s() -> float:
    """The script process's age when it handed this job over; 0.0 in a job that runs where it started."""
    try:
        return float(os.environ.get(HANDED_AGE_VARIABLE, "0"))
    except ValueError:
        return 0.0


def running(pid: str | None) -> bool:
    try:
        os.kill(int(pid or ""), 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def connect(socket_path: str, server_pid: str | None, timeout_s: float) -> socket.socket | None:
    """A connection to the server, waiting while it is still importing; None when there is none to wait for."""
    deadline = time.monotonic() + SERVER_START_WAIT_S
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.settimeout(timeout_s)
        try:
            connection.connect(socket_path)
            return connection
        except (FileNotFoundError, ConnectionRefusedError):  # not listening yet, or gone
            connection.close()
        except OSError:
            connection.close()
            return None
        if not running(server_pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def process_kind() -> str:
    """How this job's process started, recorded with its measurements (lora_study.core.gpu_slots.job_environment)."""
    return "preloaded" if os.environ.get(CHILD_VARIABLE) else "fresh"


def hand_over(age_s: float, connect_timeout_s: float = 2.0) -> None:
    """Run this job in a child of the preload server and exit with its status; return (doing nothing) when the
    job cannot be handed over, to run here."""
    socket_path = os.environ.get(SOCKET_VARIABLE)
    if not socket_path or os.environ.get(CHILD_VARIABLE) or os.environ.get("SLURM_JOB_ID"):
        return
    import lora_study

    connection = connect(socket_path, os.environ.get(PID_VARIABLE), connect_timeout_s)
    if connection is None:  # said, since the job's process kind (and a CPU job's resident set) then differs
        print(f"preload: no server answers at {socket_path}; running in this process", file=sys.stderr)
        return
    request = {
        "argv": sys.argv,
        "path": sys.path,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "executable": sys.executable,
        "package": str(Path(lora_study.__file__).resolve().parent),
        "age_s": age_s,
    }
    try:
        socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
        connection.settimeout(None)
        reply = json.loads(connection.recv(MESSAGE_BYTES) or b'{"refused": "the server closed the connection"}')
    except OSError as error:
        print(f"preload: not handed over ({error}); running in this process", file=sys.stderr)
        connection.close()
        return
    if "refused" in reply:
        print(f"preload: running in this process: {reply['refused']}", file=sys.stderr)
        connection.close()
        return
    forward: Callable[[int, Any], None] = lambda number, _frame: send(connection, {"signal": number})  # noqa: E731
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, forward)
    message = connection.recv(MESSAGE_BYTES)
    status = json.loads(message)["status"] if message else None
    code = 1 if status is None else os.waitstatus_to_exitcode(status)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(128 - code if code < 0 else code)  # killed by signal n: 128 + n, as a shell reports it


def start_server(directory: Path, log_path: Path) -> tuple[Any, Path]:
    """Start `serve` for this workflow process, in `directory`; returns the process and its socket (in a private
    folder)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lora-study-preload-"))  # 0700: only this user can connect
    socket_path = folder / "socket"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "lora_study.core.preload", str(socket_path), str(os.getpid())],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the jobs through their script processes
        )
    return server, socket_path


def stop_server(server: Any, socket_path: Path) -> None:
    import shutil
    import subprocess

    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    shutil.rmtree(socket_path.parent, ignore_errors=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
