"""Persistent stage worker: stage jobs run in processes forked from one warm interpreter.

Every model stage spends ~8 CPU-seconds importing torch and transformers before its first line
of work, and a default run has ~200 per-relation jobs whose own work is often a few seconds.
Build systems solve this with persistent workers (Bazel's, Gradle's daemon); this is ours.

``python -m kn.worker <stage> ARGS`` behaves like ``python -m kn.stages.<stage> ARGS``: it hands
its argv, working directory, environment and its stdin/stdout/stderr file descriptors to a
server that has imported the stages once, and exits with the job's exit status. The server forks
a supervisor per job, which forks the job itself: the job process takes over the client's
descriptors (so the rule's ``log:`` gets everything), chdir, environment and argv, and runs the
stage module as ``__main__``. The supervisor reports the exit status and the job's CPU time and
peak memory, and kills the job if the client goes away (Snakemake killing a job kills the client).

The first client starts the server (one per interpreter, ``sys.path``, kn source state and
import-time environment, so editing the code or switching environments starts a fresh one); the
server exits after ``KN_WORKER_IDLE`` seconds without jobs (default 120). ``KN_WORKER=0`` runs
every job cold, and so does a job under SLURM (each on its own allocation, where no server would be
reused) unless ``KN_WORKER=1``; if the server cannot be reached the client runs the job cold itself. A job's
outputs are the same either way (tests/test_worker.py).

``--record <benchmark file>`` (every rule passes its ``benchmark:`` path) leaves the job's own CPU
seconds, peak RSS and I/O for Snakemake's benchmark writer, measured by whichever process waits for
the job: the supervisor, or the client when the job runs cold (kn.jobrecord). ``KN_WORKER_USAGE=<file>``
appends one JSON line per job the server ran, and one for each server's own imports: the CPU spent
outside Snakemake's process tree (benchmarks/e2e_benchmark.py adds it to the run's total).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import kn
from kn.jobrecord import append_line, side_path

STAGES_DIR = Path(kn.__file__).resolve().parent / "stages"
# Environment read while modules are imported (not only when a job runs): part of the server's key.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_",
                   "KMP_", "TOKENIZERS_", "PYTHON", "MPLBACKEND", "LD_")
HEADER = struct.Struct("!I")  # length of the JSON request / reply that follows
START_TIMEOUT_S = 180.0  # the server's imports take ~10 s on an idle CPU; a loaded machine may need far more
KILL_GRACE_S = 5.0
STARTUP_STAGE = "worker_startup"  # the usage record of a server's own imports


class WorkerUnavailable(RuntimeError):
    """The server could not be started or reached, or dropped the job before it started."""


def worker_dir() -> Path:
    """Where sockets, locks and server logs live (``KN_WORKER_DIR``; else a per-user folder in the temp dir)."""
    configured = os.environ.get("KN_WORKER_DIR")
    base = Path(configured) if configured else Path(tempfile.gettempdir()) / f"kn-worker-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def server_key() -> str:
    """Identifies what a server has imported: interpreter, module search path, kn's source files, import-time env."""
    digest = hashlib.sha256(repr((sys.executable, sys.version, sys.path)).encode())
    for path in sorted(STAGES_DIR.parent.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_size}\n".encode())
    for name in sorted(os.environ):
        if name.startswith(IMPORT_TIME_ENV):
            digest.update(f"{name}={os.environ[name]}\n".encode())
    return digest.hexdigest()[:16]


def stage_module(stage: str) -> str:
    if not stage.isidentifier() or not (STAGES_DIR / f"{stage}.py").is_file():
        known = sorted(p.stem for p in STAGES_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "cli")
        raise SystemExit(f"kn.worker: no stage {stage!r} in {STAGES_DIR} (stages: {', '.join(known)})")
    return f"kn.stages.{stage}"


# ---------------------------------------------------------------- framing


def _send(conn: socket.socket, payload: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    if fds:
        socket.send_fds(conn, [HEADER.pack(len(data))], fds)
    else:
        conn.sendall(HEADER.pack(len(data)))
    conn.sendall(data)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket, fd_count: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    if fd_count:
        head, fds, _, _ = socket.recv_fds(conn, HEADER.size, fd_count)
        if len(head) < HEADER.size:
            head += _recv_exact(conn, HEADER.size - len(head)) or b""
    else:
        head, fds = _recv_exact(conn, HEADER.size) or b"", []
    if len(head) < HEADER.size:
        return None, fds
    data = _recv_exact(conn, HEADER.unpack(head)[0])
    return (json.loads(data) if data is not None else None), fds


# ---------------------------------------------------------------- client


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _start_server(path: Path, log_path: Path) -> int:
    """Start a server as a daemon (double fork, own session) and return its pid. It must not be the
    client's descendant: Snakemake's benchmark of this job would count every job the server runs."""
    path.unlink(missing_ok=True)  # a dead server's socket
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            server = os.fork()
            if server == 0:
                devnull = os.open(os.devnull, os.O_RDONLY)
                log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                for target, fd in ((0, devnull), (1, log), (2, log)):
                    os.dup2(fd, target)
                os.execv(sys.executable, [sys.executable, "-m", "kn.worker", "--serve", str(path)])
            os.write(write_end, str(server).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(middle, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return int(pipe.read() or 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return pid > 0


def connect_or_start() -> socket.socket:
    """A connection to this environment's server, starting it if none runs (one starter at a time)."""
    base, key = worker_dir(), server_key()
    path, log_path = base / f"{key}.sock", base / f"{key}.log"
    conn = _connect(path)
    if conn is not None:
        return conn
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        server = _start_server(path, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if not _alive(server):
                raise WorkerUnavailable(f"the worker server exited before it was ready; see {log_path}")
            time.sleep(0.05)
        if _alive(server):
            os.kill(server, signal.SIGKILL)
        raise WorkerUnavailable(f"the worker server did not start within {START_TIMEOUT_S:.0f} s; see {log_path}")


def submit(stage: str, args: list[str]) -> dict[str, Any]:
    """Run one job through the server; its reply (exit status, CPU seconds, peak RSS, wall seconds)."""
    conn = connect_or_start()
    with conn:
        _send(conn, {"stage": stage, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
        started, _ = _recv(conn)
        if started is None:
            raise WorkerUnavailable("the worker server closed the connection before starting the job")
        reply, _ = _recv(conn)
    if reply is None:
        return {"exit": 1, "error": "the job's supervisor died without reporting the job's exit status"}
    return reply


def record_usage(stage: str, args: list[str], reply: dict[str, Any]) -> None:
    """Append the usage of a job the server ran to ``KN_WORKER_USAGE`` (the CPU outside Snakemake's process tree)."""
    target = os.environ.get("KN_WORKER_USAGE")
    if target:
        append_line(target, {"stage": stage, "args": args, **reply})


def rusage_record(usage: resource.struct_rusage) -> dict[str, float]:
    """A waited-for job's CPU seconds, peak RSS and block I/O (MB), as ``wait4`` reports them."""
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "io_in_mb": round(usage.ru_inblock * 512 / 2**20, 2), "io_out_mb": round(usage.ru_oublock * 512 / 2**20, 2)}


def exit_reply(status: int, usage: resource.struct_rusage, started: float) -> dict[str, Any]:
    """What a job's waiter reports: exit status (128 + signal if killed), usage and wall seconds."""
    code = os.waitstatus_to_exitcode(status)
    reply: dict[str, Any] = {"exit": code if code >= 0 else 128 - code, **rusage_record(usage),
                             "wall_s": round(time.perf_counter() - started, 3)}
    if code < 0:
        reply["error"] = f"the job was killed by signal {-code}"
    return reply


def worker_wanted() -> bool:
    """``KN_WORKER`` 1 or 0; unset: yes, except in a SLURM job."""
    setting = os.environ.get("KN_WORKER")
    if setting is not None:
        if setting not in ("0", "1"):
            raise SystemExit(f"kn.worker: KN_WORKER={setting!r}; expected 0 (run jobs cold) or 1 (use the worker)")
        return setting == "1"
    return not os.environ.get("SLURM_JOB_ID")


def _die_with_parent() -> None:
    """In a forked child on Linux: receive SIGTERM when the parent dies (survives exec), so a cold job
    still dies with its client when Snakemake SIGKILLs the client."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def run_cold(module: str, args: list[str], record: str | None) -> int:
    """Run the stage in a fresh interpreter. Without a record to write, become it (exec); with one, wait
    for it as its parent, passing on the signals that stop jobs, and record its usage."""
    command = [sys.executable, "-m", module, *args]
    if record is None:
        os.execv(sys.executable, command)
    parent = os.getpid()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        if os.getppid() != parent:  # the client died before the death signal was armed
            os._exit(1)
        os.execv(sys.executable, command)

    def forward(received: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, received)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    _, status, usage = os.wait4(pid, 0)
    reply = exit_reply(status, usage, started)
    append_line(side_path(record), reply)
    return int(reply["exit"])


USAGE = ("usage: python -m kn.worker [--record BENCHMARK_FILE] <stage> [stage arguments...]\n"
         "  runs python -m kn.stages.<stage>; --record leaves the job's usage for that Snakemake benchmark file")


def client(argv: list[str]) -> int:
    record = None
    if argv[:1] == ["--record"] and len(argv) >= 2:
        record, argv = argv[1], argv[2:]
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("--record"):
        print(USAGE)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    stage, args = argv[0], argv[1:]
    module = stage_module(stage)
    if not worker_wanted():
        return run_cold(module, args, record)
    try:
        reply = submit(stage, args)
    except (WorkerUnavailable, OSError) as exc:
        print(f"kn.worker: {exc}; running the job in a fresh interpreter", file=sys.stderr, flush=True)
        return run_cold(module, args, record)
    if "error" in reply:
        print(f"kn.worker: {reply['error']}", file=sys.stderr)
    record_usage(stage, args, reply)
    if record is not None and "cpu_s" in reply:
        append_line(side_path(record), reply)
    return int(reply["exit"])


# ---------------------------------------------------------------- server


def preload() -> None:
    """Import what the stages import (torch, transformers and its model classes, pandas, pyarrow, matplotlib)."""
    import importlib
    import pkgutil

    import kn.models
    import kn.stages

    for package in (kn.stages, kn.models):
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    for name in ("bert", "roberta", "gpt2", "gpt_neox", "llama"):
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def run_job(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked job process: become the client's job, run the stage as ``__main__``, exit with its status."""
    import runpy
    import traceback

    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    module = f"kn.stages.{request['stage']}"
    sys.argv = [module, *request["args"]]
    sys.modules.pop(module, None)  # as in ``python -m``: the stage exists only as __main__
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - report any failure the way an uncaught exception would
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    os._exit(code)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after a grace period (outputs are written atomically, so either is safe)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def supervise(conn: socket.socket) -> NoReturn:
    """In the forked supervisor: start the job, report its status and usage, kill it if the client leaves."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = _recv(conn, 3)
    if request is None or len(fds) != 3:
        os._exit(1)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        conn.close()
        run_job(request, fds)
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        readable, _, _ = select.select([conn], [], [], 0.1)
        if readable and not conn.recv(1):  # the client is gone: so is its job
            _stop(pid)
            os._exit(1)
    try:
        _send(conn, exit_reply(status, usage, started))
    except OSError:
        pass
    os._exit(0)


def serve(path: Path) -> None:
    """Import once, then fork a supervisor per connection; exit after ``KN_WORKER_IDLE`` idle seconds."""
    begun = time.process_time()
    preload()
    idle_s = float(os.environ.get("KN_WORKER_IDLE", "120"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(min(idle_s, 5.0))
    startup = {"exit": 0, "cpu_s": round(time.process_time() - begun, 3),
               "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    record_usage(STARTUP_STAGE, [], startup)
    print(f"kn.worker {os.getpid()}: ready on {path} after {startup['cpu_s']:.1f} CPU s of imports", flush=True)
    supervisors: set[int] = set()
    last_active = time.monotonic()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                conn = None
            supervisors -= {pid for pid in supervisors if os.waitpid(pid, os.WNOHANG)[0]}
            if conn is None:
                if supervisors:
                    last_active = time.monotonic()
                elif time.monotonic() - last_active >= idle_s:
                    break
                continue
            last_active = time.monotonic()
            pid = os.fork()
            if pid == 0:
                listener.close()
                supervise(conn)
            conn.close()
            supervisors.add(pid)
    finally:
        path.unlink(missing_ok=True)  # first, so a client that arrives now starts a new server
        listener.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"] and len(argv) == 2:
        serve(Path(argv[1]))
        return 0
    return client(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
