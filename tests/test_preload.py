"""The preloaded interpreter (lora_study.core.preload): a real server, real script processes handing their jobs
over, real signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_study.core import preload

# A rule script in miniature: hands itself over first, as job() does, then acts on its first argument.
SCRIPT = """
import json, os, signal, sys, time
from lora_study.core import preload

preload.hand_over(0.25)
torch_was_loaded = "torch" in sys.modules  # this script never imports it: only a preloaded child has it
mode, out = sys.argv[1], sys.argv[2]
if mode == "record":
    record = {"pid": os.getpid(), "child": os.environ.get(preload.CHILD_VARIABLE), "cwd": os.getcwd(),
              "argv": sys.argv, "marker": os.environ.get("MARKER"), "age_s": preload.handed_over_age_s(),
              "torch_was_loaded": torch_was_loaded, "tmp": __import__("tempfile").gettempdir()}
    open(out, "w").write(json.dumps(record))
    print("to stdout")
    print("to stderr", file=sys.stderr)
    sys.exit(3)
if mode == "raise":
    raise ValueError("boom in the job")
if mode == "term":
    def stopped(number, frame):
        open(out + ".stopped", "w").write(str(number))
        sys.exit(7)
    signal.signal(signal.SIGTERM, stopped)
open(out, "w").write(str(os.getpid()))
time.sleep(120)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preload")
    process, socket_path = preload.start_server(folder, folder / "server.log")
    deadline = time.monotonic() + 300
    while "serving on" not in (folder / "server.log").read_text():
        assert process.poll() is None, (folder / "server.log").read_text()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    yield socket_path
    preload.stop_server(process, socket_path)
    assert process.poll() is not None and not socket_path.parent.exists()


def client(tmp_path: Path, socket_path: Path | None, *args: str, **env: str) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    environment = {**os.environ, **env}
    environment.pop(preload.SOCKET_VARIABLE, None)
    if socket_path is not None:
        environment[preload.SOCKET_VARIABLE] = str(socket_path)
    return subprocess.Popen(
        [sys.executable, str(script), *args], cwd=tmp_path, env=environment, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(path: Path, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_handed_over_job_runs_in_a_preloaded_child_with_the_script_process_own_everything(server, tmp_path):
    out = tmp_path / "record.json"
    process = client(tmp_path, server, "record", str(out), MARKER="job-42", TMPDIR=str(tmp_path))
    stdout, stderr = process.communicate(timeout=120)
    record = json.loads(out.read_text())
    assert process.returncode == 3, stderr  # the child's exit status is the script process's
    assert record["child"] == "1" and record["torch_was_loaded"] and record["pid"] != process.pid
    assert record["cwd"] == str(tmp_path) and record["marker"] == "job-42" and record["tmp"] == str(tmp_path)
    assert record["argv"][1:] == ["record", str(out)]
    assert record["age_s"] == pytest.approx(0.25)  # the script process's age is the job's start phase
    assert stdout == "to stdout\n" and stderr == "to stderr\n"  # through the script process's own stdio


def test_an_uncaught_exception_reads_as_in_a_fresh_interpreter(server, tmp_path):
    process = client(tmp_path, server, "raise", str(tmp_path / "unused"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" in stderr and "ValueError: boom in the job" in stderr


def test_signals_to_the_script_process_reach_the_job(server, tmp_path):
    out = tmp_path / "pid"
    process = client(tmp_path, server, "term", str(out))
    job_pid = int(wait_for(out))
    assert job_pid != process.pid
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 7  # the job's own SIGTERM handler ran and chose the status
    assert (tmp_path / "pid.stopped").read_text() == str(int(signal.SIGTERM))
    assert gone(job_pid, 10)


def test_a_job_whose_script_process_was_killed_outright_is_killed_too(server, tmp_path):
    """SIGKILL cannot be forwarded: the job dies as the script process did, without running its SIGTERM handler
    (a training job would otherwise save a checkpoint a killed one never saves)."""
    out = tmp_path / "pid"
    process = client(tmp_path, server, "term", str(out))
    job_pid = int(wait_for(out))
    process.kill()
    process.communicate(timeout=60)
    assert gone(job_pid, 10), "the orphaned job kept running"
    assert not (tmp_path / "pid.stopped").exists()


@pytest.mark.parametrize(
    "case, env",
    [
        ("an import-time variable differs", {"ATEN_CPU_CAPABILITY": "default"}),
        ("a SLURM job", {"SLURM_JOB_ID": "17"}),
    ],
)
def test_a_job_that_cannot_be_handed_over_runs_in_its_own_process(server, tmp_path, case, env):
    out = tmp_path / "record.json"
    process = client(tmp_path, server, "record", str(out), **env)
    _, stderr = process.communicate(timeout=120)
    record = json.loads(out.read_text())
    assert process.returncode == 3, case
    assert record["child"] is None and not record["torch_was_loaded"] and record["pid"] == process.pid, case
    if "ATEN_CPU_CAPABILITY" in env:
        assert "variables read at import differ: ['ATEN_CPU_CAPABILITY']" in stderr


def test_without_a_server_the_job_runs_where_it_started(tmp_path):
    out = tmp_path / "record.json"
    process = client(tmp_path, tmp_path / "no-such-socket", "record", str(out))
    _, stderr = process.communicate(timeout=120)
    record = json.loads(out.read_text())
    assert process.returncode == 3 and record["child"] is None and record["pid"] == process.pid
    assert "preload: no server answers" in stderr  # said: the job's process kind differs from its study's


def test_when_the_workflow_does_without_the_server():
    def reason(**changes):
        settings = dict(enabled=True, device="cpu", local=True, isolated_envs=False, stack_jobs=12) | changes
        return preload.reason_not_to_start(**settings)

    assert reason() is None
    assert "execution.preload" in reason(enabled=False)
    assert "cluster" in reason(local=False)
    assert "--sdm" in reason(isolated_envs=True)
    assert "1 job(s)" in reason(stack_jobs=1)
    assert (reason(device="auto") is None) != preload.gpus_present()  # a GPU machine keeps one process per job


def test_a_job_waits_for_a_server_that_is_still_importing(tmp_path):
    """Every job of a study then runs the same way (a forked job's CPU resident set differs from a fresh one's)."""
    process, socket_path = preload.start_server(tmp_path, tmp_path / "server.log")
    try:
        assert "serving on" not in (tmp_path / "server.log").read_text()  # still importing the stack
        out = tmp_path / "record.json"
        job = client(tmp_path, socket_path, "record", str(out), **{preload.PID_VARIABLE: str(process.pid)})
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 3, stderr
        assert json.loads(out.read_text())["child"] == "1"
    finally:
        preload.stop_server(process, socket_path)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling (a kernel before 5.3)"])
def test_the_monitor_reports_the_exit_status_and_kills_the_job_when_its_script_is_gone(monkeypatch, pidfd):
    import socket

    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")
    for script_killed in (False, True):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = os.fork()
        if child == 0:  # a job: exits 5 after a moment, unless killed first
            ours.close()
            theirs.close()  # the job holds no end of the script's connection, as in the server
            time.sleep(0.3)
            os._exit(5)
        if script_killed:
            theirs.close()
        started = time.monotonic()
        preload.watch(child, ours)
        if script_killed:
            assert time.monotonic() - started < 0.25  # killed at once, not left to finish
            with pytest.raises(ChildProcessError):
                os.waitpid(child, os.WNOHANG)  # and reaped
        else:
            assert os.waitstatus_to_exitcode(json.loads(theirs.recv(1024))["status"]) == 5
        ours.close()
