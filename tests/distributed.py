"""`run_distributed(fn, world_size, *args)`: run `fn(rank, world_size, *args)` in `world_size` real
processes joined by a gloo process group (as torchrun would), and return each rank's result.

`fn` must be a module-level function (it is pickled by name into the children). Results travel
back through a multiprocessing queue; an exception on any rank fails the test with that rank's
traceback.

Ranks are forked from a multiprocessing fork server that has imported torch and the engine once
(tests/_preload.py): a fresh interpreter per rank costs ~1 s of `import torch` on a quiet 2-core
machine and a minute under load, a fork from the server well under a second. Each rank is still
a new process with its own gloo group and no state from the test process; it gets the test
process's environment as it is at launch (the fork server's own is that of its start), and the
engine modules as they were when the server started (tests never edit code mid-session). A forked
rank would also inherit the server's stdout and stderr, not the test's (pytest's capture of the
test that started the server), so each rank writes both to files that the test process copies to
its own sys.stdout / sys.stderr, rank by rank, once the ranks are done (capsys / capfd see them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, environ, outputs):
    for fd, path in zip((1, 2), outputs):
        sys.stdout.flush() if fd == 1 else sys.stderr.flush()
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


def kill_job(pid: int) -> None:
    """SIGKILL a launcher (torchrun) and every process below it, as a lost node would be killed.
    torchrun starts each worker in a session of its own, so killing the launcher's process group
    leaves its ranks running as orphans: collect the whole tree first, then kill it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_until_then_kill(args: list[str], pointer: str, nproc: int, cwd: str) -> None:
    """`torchrun -m gigatron.core.train ARGS` on nproc local ranks, SIGKILLed (launcher and every
    rank) as soon as the file `pointer` appears (a checkpoint's `latest`), or after 300 s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "gigatron.core.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(pointer) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    kill_job(proc.pid)
    proc.wait()


def _copy_outputs(outputs) -> None:
    for out, err in outputs:
        for path, stream in ((out, sys.stdout), (err, sys.stderr)):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    stream.write(f.read())
                stream.flush()


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests._preload"])
    return ctx


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    environ = dict(os.environ)
    logs = tempfile.mkdtemp(prefix="gigatron_ranks_")
    outputs = [(os.path.join(logs, f"{r}.out"), os.path.join(logs, f"{r}.err")) for r in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ, outputs[r]),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
        _copy_outputs(outputs)
        shutil.rmtree(logs, ignore_errors=True)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
