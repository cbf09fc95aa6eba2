"""The replicas in a process of their own (`serve --engine-process`): HTTP in the server's process, the model,
the scheduler threads and the python tool in a child process, one pipe between them.

Why: in one process the event loop and a replica's scheduler thread share one interpreter lock. The event loop
spends tens of microseconds of CPU per streamed token (53-84 us per decoded row on the 2-core CPU machine, with
h11 and asyncio), and each of those is time the scheduler waits to launch its next step or prefill. Without HTTP
(`Pool` fed directly, 64 streams of 64-token prompts, depth-2 model, that machine) the scheduler gave 4,500-5,350
tokens/s, against 3,496 behind the server in the same process.

The pipe carries pickled messages:
- server -> engine: ("submit", [job spec, ...]) for one HTTP request's jobs, ("cancel", id), ("close",);
- engine -> server: ("ready", info) or ("failed", message) once, then ("events", [(id, item), ...], stats, timing)
  batches, each holding whatever the scheduler emitted since the last was sent (one per decode step when the
  server keeps up, more per message when it does not).

The server side (`ProcessPool`) has what serve.py uses of a `Pool`: submit (capacity and queue limits checked here,
so a refusal is still immediate), queued(), stats, timing, prefill_chunk, replicas, close(). A job's choices are
rebuilt from its deltas (text, finish, logprob entries) and the token counts its end brings, so a non-streaming
response reads them as before. If the engine process dies, every open request gets an error and later ones a 503.
"""

from __future__ import annotations

import atexit
import multiprocessing
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from picochat.config import UserError
from picochat.serving.batcher import Pool, Rejected, batchable, check_capacity, post

# ----------------------------------------------------------------------------------------------------------------
# The engine process


class _Outbox:
    """Events of every job, sent to the server by one thread in batches (a step's events leave in one message)."""

    def __init__(self, conn, pool: Pool):
        self.conn, self.pool = conn, pool
        self.items: list[tuple[int, tuple]] = []
        self.cv = threading.Condition()
        self.closed = False

    def put(self, jid: int, item: tuple) -> None:
        with self.cv:
            self.items.append((jid, item))
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.items and not self.closed:
                    self.cv.wait()
                items, self.items = self.items, []
            if not items:
                return
            try:
                self.conn.send(("events", items, dict(self.pool.stats), dict(self.pool.timing)))
            except (OSError, ValueError):  # the server is gone: nobody is listening
                return


def _remote_job(job_cls: type, outbox: _Outbox, jobs: dict, spec: dict) -> Any:
    """A serve.Job whose events go into the outbox, tagged with the server's id for it; it leaves `jobs` (the
    cancellable ones) when it ends."""
    jid = spec.pop("id")
    job = job_cls(**spec)

    def send(item: tuple) -> None:
        if item[0] in ("end", "error"):  # the server's copy of the choices gets its token counts with the end
            jobs.pop(jid, None)
            item = (*item, [c.tokens for c in job.choices])
        outbox.put(jid, item)

    def start(engine, strings) -> None:
        outbox.put(jid, ("started", None))  # it left the queue: the server's queue count drops
        job_cls.start(job, engine, strings)

    job.send, job.start = send, start
    return job


def engine_main(conn, factory: Callable, args: tuple, job_cls: type, strings: Callable, pool_kw: dict) -> None:
    """The child process: build the engines (`factory(*args)` -> (engines, model name)), a Pool over them, then
    serve the pipe until the server closes it or goes away. `job_cls` and `strings` are the server's Job and
    TokenStrings (passed by reference, as `Pool` takes them, so this module does not import the server)."""
    try:
        engines, model_name = factory(*args)
        pool = Pool(engines, strings, **pool_kw)
    except KeyboardInterrupt:
        return
    except BaseException as e:  # said once, by the server's process
        conn.send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)))
        return
    e0 = engines[0]
    conn.send(("ready", {"model_name": model_name, "tokenizer": e0.tokenizer, "context": e0.max_context,
                         "replicas": len(engines), "batchable": batchable(e0), "max_rows": pool.max_rows,
                         "batch_tokens": pool.batch_tokens, "prefill_chunk": pool.prefill_chunk,
                         "mode": getattr(e0, "mode", None), "device": str(getattr(e0, "device", "")),
                         "stats": dict(pool.stats), "timing": dict(pool.timing)}))
    outbox = _Outbox(conn, pool)
    sender = threading.Thread(target=outbox.run, name="picochat-engine-sender", daemon=True)
    sender.start()
    jobs: dict[int, Any] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the server is gone
                break
            if msg[0] == "submit":
                batch = []
                for spec in msg[1]:
                    jobs[spec["id"]] = job = _remote_job(job_cls, outbox, jobs, dict(spec))
                    batch.append(job)
                try:
                    pool.submit(batch, None, None)
                except Rejected as e:  # the server checked the same limits first; should it still happen
                    for job in batch:
                        job.send(("error", e.message))
            elif msg[0] == "cancel":
                job = jobs.get(msg[1])
                if job is not None:
                    job.cancelled.set()
            elif msg[0] == "close":
                break
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the server shuts down on its own
        pass
    finally:
        pool.close()
        for t in pool.threads:
            t.join(5)
        outbox.close()
        sender.join(5)


# ----------------------------------------------------------------------------------------------------------------
# The server process


@dataclass
class _Choice:
    """The server's copy of one choice, rebuilt from its deltas (what ChoiceText holds in the engine process)."""

    text: str = ""
    finish: str | None = None
    tokens: int = 0
    entries: list = field(default_factory=list)


class _Cancel(threading.Event):
    """A job's `cancelled` on the server's side: setting it also tells the engine process (once)."""

    def __init__(self, pool: "ProcessPool", jid: int):
        super().__init__()
        self.pool, self.jid = pool, jid

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self.pool._cancel(self.jid)


class ProcessPool:
    """`Pool`'s interface for serve.py, with the Pool in a child process (see the module docstring). The child is
    spawned, so a script that builds one must do so under `if __name__ == "__main__":` (the CLI does)."""

    def __init__(self, factory: Callable, args: tuple, job_cls: type, strings: Callable, max_rows: int = 64,
                 batch_tokens: int = 0, max_queue: int = 256, prefill_chunk: int = 0):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child = ctx.Pipe()
        pool_kw = dict(max_rows=max_rows, batch_tokens=batch_tokens, max_queue=0, prefill_chunk=prefill_chunk)
        # not a daemon: Inductor's compile workers are child processes of the engine process
        self.proc = ctx.Process(target=engine_main, args=(child, factory, args, job_cls, strings, pool_kw),
                                name="picochat-engine")
        self.proc.start()
        child.close()
        try:
            kind, info = self._conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise UserError(f"serve: the engine process exited while loading the model (exit code "
                            f"{self.proc.exitcode}); its output above says why") from None
        if kind == "failed":
            self.proc.join(10)
            raise UserError(info)
        self.info = info
        self.tokenizer, self.context, self.model_name = info["tokenizer"], info["context"], info["model_name"]
        self.max_rows, self.batch_tokens = info["max_rows"], info["batch_tokens"]
        self.prefill_chunk, self.max_queue = info["prefill_chunk"], max_queue
        self.stats, self.timing = info["stats"], info["timing"]
        self.replicas = [None] * info["replicas"]
        self.closed, self.dead = False, None
        self.jobs: dict[int, Any] = {}
        self.waiting: set[int] = set()  # submitted, not yet started by a replica
        self._next = 0
        self._lock = threading.RLock()
        self.reader = threading.Thread(target=self._read, name="picochat-engine-reader", daemon=True)
        self.reader.start()
        # a server that never ran its shutdown (an app built and dropped, an exception) still stops the child at
        # exit, before multiprocessing's own exit handler joins it (handlers run last registered, first)
        atexit.register(self.close)

    # -- Pool's interface -------------------------------------------------------------------------------------

    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, jobs: list, loop, events) -> None:
        """Queue one HTTP request's jobs in the engine process (all or none). Raises Rejected."""
        if self.dead is not None:
            raise Rejected(503, f"the engine process has stopped ({self.dead}); restart the server", None,
                           "engine_stopped")
        if self.info["batchable"]:
            for job in jobs:
                check_capacity(job, self.max_rows, self.batch_tokens, self.context)
        with self._lock:
            if self.max_queue and len(self.waiting) + len(jobs) > self.max_queue:
                raise Rejected(503, f"the server is busy: {len(self.waiting)} requests are queued (--max-queue "
                                    f"{self.max_queue}); retry shortly", None, "server_overloaded")
            specs = []
            for job in jobs:
                jid, self._next = self._next, self._next + 1
                job.loop, job.events, job.cancelled = loop, events, _Cancel(self, jid)
                job.choices = [_Choice() for _ in range(job.params.n)]
                self.jobs[jid] = job
                self.waiting.add(jid)
                specs.append({"id": jid, "prompt": job.prompt, "params": job.params, "index0": job.index0,
                              "raw": job.raw, "echo_from": job.echo_from})
            self._send(("submit", specs))

    def close(self) -> None:
        """Stop the engine process (its scheduler threads finish their iteration) and wait for it."""
        if self.closed:
            return
        self.closed = True
        self._send(("close",))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self._conn.close()

    # -- the pipe ---------------------------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        with self._lock:
            try:
                self._conn.send(msg)
            except (OSError, ValueError):
                pass  # the reader sees the process gone and fails what is open

    def _cancel(self, jid: int) -> None:
        if jid in self.jobs and not self.closed:
            self._send(("cancel", jid))

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError, ValueError):
                break
            _, items, self.stats, self.timing = msg
            got = []
            for jid, item in items:
                job = self.jobs.get(jid)
                if job is None:
                    continue
                self.waiting.discard(jid)  # started, ended or failed: not queued any more
                if item[0] == "started":
                    continue
                if item[0] in ("end", "error"):
                    del self.jobs[jid]
                got.append((job, _mirror(job, item)))
            post(got)  # to each request's event loop, as the in-process scheduler posts them
        self._gone()

    def _gone(self) -> None:
        """The engine process ended: fail every open job (a server shutting down has none left)."""
        self.proc.join(5)
        self.dead = f"exit code {self.proc.exitcode}"
        open_jobs, self.jobs = self.jobs, {}
        self.waiting.clear()
        why = f"the engine process stopped ({self.dead})"
        post([(job, ("error", why)) for job in open_jobs.values()])


def _mirror(job: Any, item: tuple) -> tuple:
    """Update the server's copy of a job's choices from one of its events (before the event reaches the request's
    handler, which reads the choices only once the job has ended); the event as the handler expects it."""
    if item[0] == "delta":
        for i, text, finish, entries in item[1]:
            c = job.choices[i - job.index0]
            c.text += text
            c.finish = finish or c.finish
            c.entries.extend(entries)
    elif item[0] in ("end", "error"):
        for c, n in zip(job.choices, item[2]):
            c.tokens = n
        item = item[:2]
    return item
