"""The Cog process's side of a multi-GPU predictor: it starts one rank process per GPU,
hands each request to all of them, and reports what rank 0 says. It loads no model itself.

- Setup: the weights are made ready once here (one download), then each rank loads them
  from the cache; any rank's failure fails setup with that rank's error, or, where it
  timed out waiting for ranks that never came (one hung in its load), names those first.
- A request: rank 0's log lines and metrics are logged and recorded here, in the thread Cog
  runs the prediction in, so the prediction carries them as on one GPU.
- Cancel: Cog raises its CancelationException in that thread; the group sets the ranks'
  shared flag, waits until every rank has stopped (after the same step), and re-raises.
  The exception may land at any bytecode, so that thread neither writes nor reads a pipe
  (_Outbox, _Inbox), and keeps every answer it read in a dict the wait after a cancel
  carries on with.
- A rank that exits fails the running prediction at once, the other ranks are stopped, and
  healthcheck() fails from then on, so the orchestrator replaces the container.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

import cog

from .. import inputs
from ..errors import InputError, RankGroupError
from ..generator import Request
from ..pipeline import MODE_TASK, Mode
from ..variants import PREDICTOR_FILES, variant_from_env
from ..weights import ensure_weights
from . import ranks
from .protocol import (
    Canceled,
    Check,
    Done,
    Failed,
    LogLine,
    Metric,
    Outcome,
    Progress,
    RankExited,
    Read,
    Reading,
    Ready,
    Render,
    SettingUp,
    SetupFailed,
    SetupStep,
    StepEnded,
)
from .ranks import collective_timeout

log = logging.getLogger(__name__)
relayed = logging.getLogger("cogvideox_cog")  # rank 0's lines, logged as it logged them

POLL_S = 0.05  # the prediction thread waits in slices this long, so that a cancel lands
# Every rank stops after its current step; one that does not is stuck (but rank 0 alone, after
# the others: _working_alone), unless the steps take longer (_StepClock) or rank 0 is still
# reporting Progress within one: stuck ranks are silent this long.
CANCEL_BOUND_S = 30.0
STEP_MARGIN = 2.0  # a step may take this many times the longest one before it
FAILURE_GRACE_S = 10.0  # after one rank fails, the others report too, or are stuck
STOP_S = 5.0  # a rank asked to stop exits within this, or is killed


class RankGroup:
    """N rank processes (ranks.py) serving one video each request, with VideoGenerator's
    predict(request) -> Path."""

    def __init__(self, mode: Mode, world_size: int):
        self.mode, self.world_size = mode, world_size
        self.failure: str | None = None  # why the group cannot serve any more
        self._closing = False
        context = multiprocessing.get_context("spawn")
        self._cancel = context.Event()
        self._processes: list[multiprocessing.Process] = []
        self._conns: list[Connection] = []
        # Held here from the start, so that no other program can take the port before the
        # ranks meet on it (as with a port picked, released, then bound by rank 0).
        self._rendezvous = ranks.rendezvous_store()
        for rank in range(world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=ranks.serve,
                args=(rank, world_size, mode, self._rendezvous.port, theirs, self._cancel),
                name=f"cogvideox-rank-{rank}",
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._conns.append(ours)
        atexit.register(self.close)
        self._inbox = _Inbox(self._processes, self._conns, self._rank_ended, self._failed)
        self._outbox = _Outbox()
        # The command being answered, until its answers are all in: see _finish_unsettled.
        self._unsettled: tuple[_Handout, dict[int, Outcome], int | None] | None = None
        self._steps = _StepClock()  # of the command being answered
        self._progressed: float | None = None  # rank 0's last Progress in that command
        self._reading: dict[int, float] = {}  # rank: when it began reading that command's inputs

    @classmethod
    def start(cls, mode: Mode, world_size: int) -> RankGroup:
        """Weights ready, ranks started and loaded: a group that serves, or RankGroupError."""
        started = time.monotonic()
        variant = variant_from_env(MODE_TASK[mode], PREDICTOR_FILES[mode])
        ensure_weights(variant)  # here, once: the ranks then find them in the cache
        log.info(f"setup: starting {world_size} rank processes")
        group = cls(mode, world_size)
        group._await_ready()
        pids = ", ".join(str(process.pid) for process in group._processes)
        log.info(
            f"setup: {world_size} ranks ready in {time.monotonic() - started:.1f} s (pids {pids})"
        )
        return group

    def _await_ready(self) -> None:
        ready: set[int] = set()
        steps: dict[int, SetupStep] = {}  # rank: the step of its setup it last began
        while len(ready) < self.world_size:
            message = self._inbox.next(timeout=None)
            if isinstance(message, LogLine):
                relayed.log(message.level, message.text)
            elif isinstance(message, SettingUp):
                steps[message.rank] = message.step
            elif isinstance(message, Ready):
                ready.add(message.rank)
            elif isinstance(message, SetupFailed):
                behind = self._behind(message.rank, steps, ready)
                self._break(_setup_failed_text(message, steps.get(message.rank), behind))
            elif isinstance(message, RankExited):
                ended = f"rank {message.rank} {_exit_text(message)} during setup"
                behind = self._behind(message.rank, steps, ready)
                self._break(ended + (f"; {_never_ready_text(behind)}" if behind else ""))
            elif isinstance(message, _InboxFailed):
                self._break(message.failure)
            self._inbox.done()

    def _behind(
        self, rank: int, steps: dict[int, SetupStep], ready: set[int]
    ) -> dict[int, SetupStep | None]:
        """The ranks not ready and still at an earlier step of setup than `rank` (None: one
        that has not begun any), with that step: those it waits for in its collective."""
        at = steps.get(rank)
        return {
            other: steps.get(other)
            for other in range(self.world_size)
            if other not in ready and at is not None and steps.get(other, -1) < at
        }

    def check(self, request: Request) -> None:
        """VideoGenerator.check, run by rank 0: the checks need its model's settings."""
        if self.failure is not None:
            raise RankGroupError(f"cannot predict: {self.failure}. Restart the server.")
        self._finish_unsettled()
        command, answers = _Handout(Check(request), self._conns[:1]), {}
        self._unsettled, self._steps = (command, answers, 1), _StepClock()
        self._progressed, self._reading = None, {}  # a check reads no inputs
        try:
            self._outbox.send(command)
            self._outcomes(answers, answering=1)
        except RankGroupError:
            raise
        except BaseException:  # a cancel: read the answer, or the next request takes it
            self._await_stop(command, answers, answering=1)
            self._unsettled = None
            raise
        self._unsettled = None
        if isinstance(answers[0], Failed):
            raise _error(answers[0])

    def predict(self, request: Request) -> Path:
        """Every rank renders the request; rank 0's mp4 (one kept on disk, as on one GPU)."""
        if self.failure is not None:
            raise RankGroupError(f"cannot predict: {self.failure}. Restart the server.")
        self._finish_unsettled()
        request = replace(request, seed=inputs.resolve_seed(request.seed))
        self._cancel.clear()
        render, outcomes = _Handout(Render(request), self._conns), {}
        self._unsettled, self._steps = (render, outcomes, None), _StepClock()
        self._progressed, self._reading = None, {}
        try:
            self._outbox.send(render)
            self._outcomes(outcomes)
        except RankGroupError:
            raise
        except BaseException:  # Cog's CancelationException, raised in this thread
            self._cancel.set()
            self._await_stop(render, outcomes)
            self._unsettled = None
            if render.sent:
                log.info(f"canceled: {len(outcomes)} ranks stopped, {_where_stopped(outcomes)}")
            raise
        self._unsettled = None
        self._stop_if_a_gpu_is_lost(outcomes)
        return _output(outcomes)

    def _stop_if_a_gpu_is_lost(self, outcomes: dict[int, Outcome]) -> None:
        """A rank whose GPU failed for good (its Failed says why) would fail every later
        request: stop the group, so the health check fails and the worker is restarted."""
        lost = _lost_gpu(outcomes)
        if lost is not None:
            self._break(_gpu_lost_text(lost))

    def _finish_unsettled(self) -> None:
        """Stop what an earlier command left running on the ranks, before the next one.

        A second cancel can land after the first one's `except` and before the wait's `try`,
        where nothing catches it: that command's ranks may still be rendering (or their
        answers unread), and the next request would pair with them. A cancel of the new
        prediction that lands during this wait is raised once the ranks are idle.
        """
        if self._unsettled is None:
            return
        handout, outcomes, answering = self._unsettled
        log.warning("the ranks still had a canceled request: waiting until they stop it")
        self._cancel.set()
        cancel = self._await_stop(handout, outcomes, answering)
        self._unsettled = None
        if cancel is not None:
            raise cancel

    def _await_stop(
        self, handout: _Handout, outcomes: dict[int, Outcome], answering: int | None = None
    ) -> BaseException | None:
        """After a cancel: once the outbox has sent the handout to every rank or withdrawn it,
        wait until every rank that got it has answered, whatever else Cog raises meanwhile (a
        second cancel): the next request must find them all idle. `outcomes` holds what was
        read before the cancel: a rank that answered then (rank 1 while rank 0 decodes) will
        not answer again, and waiting for it would take it for stuck. Returns the last
        exception it swallowed meanwhile, if any."""
        swallowed = None
        while True:
            try:
                if self._outbox.settle(handout):
                    self._outcomes(outcomes, bound=CANCEL_BOUND_S, answering=answering)
                return swallowed
            except RankGroupError:
                raise
            except BaseException as error:
                swallowed = error
                continue

    def _outcomes(
        self,
        outcomes: dict[int, Outcome],
        bound: float | None = None,
        answering: int | None = None,
    ) -> None:
        """Each rank's outcome of the request (of the first `answering` ranks') into
        `outcomes`, relaying rank 0's log lines and metrics. With a `bound`, ranks still
        at work past it are stuck (of those asked: a check asks rank 0 alone), unless a step
        is under way that may still end, rank 0 reported Progress within the last `bound`
        seconds, or one of them is still reading the inputs (the others wait for it)."""
        waiting = time.monotonic()
        deadline = None if bound is None else waiting + bound
        answering = answering or self.world_size
        while len(outcomes) < answering:
            now = time.monotonic()
            if deadline is not None and now > self._extended(deadline, bound):
                missing = sorted(set(range(answering)) - set(outcomes))
                # A rank still reading a long clip is slow, not stuck: it fails as the others
                # did, or reaches the collectives, where it is held to the bound, and those
                # that have read wait for it there. Unless it reads for longer than a
                # collective may wait: then it has hung (_reading_s), and it alone is named.
                readers = [rank for rank in missing if rank in self._reading]
                reading_s = self._reading_s(readers, now)
                if reading_s is not None and reading_s > collective_timeout().total_seconds():
                    read = f"reading the inputs within {reading_s:.0f} s"
                    self._break(_lost_gpu_first(outcomes, f"ranks {readers} did not finish {read}"))
                if not _working_alone(missing, outcomes) and reading_s is None:
                    waited = f"within {now - waiting:.0f} s{_after_failure(outcomes)}"
                    self._break(
                        _lost_gpu_first(outcomes, f"ranks {missing} did not finish {waited}")
                    )
            message = self._inbox.next(timeout=POLL_S)
            if message is None:
                continue
            if isinstance(message, LogLine):
                relayed.log(message.level, message.text)
            elif isinstance(message, Metric):
                cog.current_scope().record_metric(message.name, message.value)
            elif isinstance(message, StepEnded):
                self._steps.ended(message.seconds)
            elif isinstance(message, Progress):
                self._progressed = time.monotonic()
            elif isinstance(message, Reading):
                self._reading[message.rank] = time.monotonic()
            elif isinstance(message, Read):
                self._reading.pop(message.rank, None)
                if deadline is not None:  # it now reaches the collectives: held to the bound
                    deadline = max(deadline, time.monotonic() + bound)
            elif isinstance(message, RankExited):
                self._break(f"rank {message.rank} {_exit_text(message)} during a prediction")
            elif isinstance(message, _InboxFailed):
                self._break(message.failure)
            elif isinstance(message, Done | Canceled | Failed):
                outcomes[message.rank] = message
                if isinstance(message, Failed) and deadline is None and len(outcomes) < answering:
                    # The others fail alike on a bad input; if only this one failed, they
                    # wait for it in a collective: stop them, or give up on them.
                    self._cancel.set()
                    waiting, bound = time.monotonic(), FAILURE_GRACE_S
                    deadline = waiting + bound
            self._inbox.done()

    def _reading_s(self, readers: list[int], now: float) -> float | None:
        """How long the `readers` have been reading the inputs (since the first of them
        began); None if none is. One that reads for longer than a collective may wait
        (ranks.collective_timeout) has hung (a decoder's endless loop, a read that blocks): no
        input the limits accept takes that long, and the other ranks, waiting for it in their
        first collective, would time out."""
        if not readers:
            return None
        return now - min(self._reading[rank] for rank in readers)

    def _extended(self, deadline: float, bound: float) -> float:
        """`deadline`, or later while a step may still be under way (_StepClock) or rank 0
        reported Progress less than `bound` ago: ranks stuck in a collective report none."""
        extended = self._steps.extended(deadline)
        if self._progressed is None:
            return extended
        return max(extended, self._progressed + bound)

    def healthcheck(self) -> bool:
        """Cog's health check: True, or RankGroupError saying which rank ended and how (Cog
        then reports UNHEALTHY with that text)."""
        if self.failure is not None:
            raise RankGroupError(self.failure)
        return True

    def _rank_ended(self, exited: RankExited) -> None:
        """From the inbox's thread, whenever a rank process ends: idle or busy, the group
        cannot serve without it."""
        self._failed(f"rank {exited.rank} {_exit_text(exited)}")

    def _failed(self, failure: str) -> None:
        if self.failure is None and not self._closing:
            self.failure = failure

    def _break(self, failure: str) -> None:
        """The group cannot serve any more: stop every rank and say why."""
        if self.failure is None:
            self.failure = failure
        log.error(f"GPU group stopped: {failure}")
        self.close(ask=False)  # they may be waiting for a dead rank in a collective
        raise RankGroupError(failure)

    def close(self, ask: bool = True) -> None:
        """Stop the ranks: asked first (unless ask is False), then terminated, then killed."""
        self._closing = True
        for conn, process in zip(self._conns, self._processes, strict=True):
            with self._inbox.reaping:
                alive = process.is_alive()
            if ask and alive:
                with contextlib.suppress(OSError):  # it ended meanwhile
                    conn.send(None)
        deadline = time.monotonic() + (STOP_S if ask else 0.0)
        for process in self._processes:
            with self._inbox.reaping:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.terminate()
                    process.join(1)
                if process.is_alive():
                    process.kill()
                    process.join()
        self._inbox.close()
        self._outbox.close()
        self._rendezvous = None  # its server stops with the last reference


class _StepClock:
    """When the ranks' last denoising step ended and how long the longest took (rank 0's
    StepEnded), so that a step slower than CANCEL_BOUND_S (a large video on slower GPUs,
    or offloaded weights) is not taken for stuck ranks."""

    def __init__(self):
        self.last: float | None = None
        self.longest = 0.0

    def ended(self, seconds: float) -> None:
        self.last, self.longest = time.monotonic(), max(self.longest, seconds)

    def extended(self, deadline: float) -> float:
        """`deadline`, or later while the step under way may take STEP_MARGIN times the
        longest one so far."""
        if self.last is None:
            return deadline
        return max(deadline, self.last + STEP_MARGIN * self.longest)


def _setup_failed_text(
    failed: SetupFailed, at: SetupStep | None, behind: dict[int, SetupStep | None]
) -> str:
    """Why setup failed: the rank's error, or, where it gave up waiting in a collective (at
    step `at`) for ranks still at an earlier step (one hung loading its weights), those
    ranks first, its timeout as the cause: its error alone names the rank that waited."""
    if not (failed.timed_out and behind):
        return f"rank {failed.rank} failed in setup: {failed.error}"
    them = "it" if len(behind) == 1 else "them"
    gave_up = f"rank {failed.rank} gave up waiting for {them} while {at}: {failed.error}"
    return f"{_never_ready_text(behind)}; {gave_up}"


def _never_ready_text(behind: dict[int, SetupStep | None]) -> str:
    doing = ", ".join(
        f"rank {rank} was {'starting' if step is None else step}" for rank, step in behind.items()
    )
    return f"ranks {sorted(behind)} never said ready ({doing})"


def _working_alone(missing: list[int], outcomes: dict[int, Outcome]) -> bool:
    """Whether only rank 0 is still at the request, the others done or canceled with it:
    then it decodes, post-processes or encodes on its own, past every collective, so it is
    slow (a large upscaled video), not stuck, and is waited for as one GPU would be. Not
    when no other rank was asked (a check): then nothing says rank 0 is past its work."""
    others_stopped = all(isinstance(o, Done | Canceled) for o in outcomes.values())
    return missing == [0] and bool(outcomes) and others_stopped


def _where_stopped(outcomes: dict[int, Outcome]) -> str:
    """Where a canceled render stopped, for its log line: after a step (every rank agreed on
    it), before the first one (rank 0's LoRA download or prompt rewrite), after the last one
    (rank 0 post-processing alone, the others done), or not at all (the video was done)."""
    steps = sorted({o.step + 1 for o in outcomes.values() if isinstance(o, Canceled)})
    failed = sorted(rank for rank, o in outcomes.items() if isinstance(o, Failed))
    if failed:
        return f"after rank {failed[0]} failed"
    if steps != [0]:
        return f"after step {steps}" if steps else "after the video was done"
    if all(isinstance(o, Canceled) for o in outcomes.values()):
        return "before the first step"
    return "after the last step, while rank 0 post-processed the video"


def _after_failure(outcomes: dict[int, Outcome]) -> str:
    """What the ranks left waiting in a collective were waiting for: the rank that failed
    alone, and its error (an out-of-memory error on one GPU, say), or nothing. A rank whose
    GPU is lost is named alone: its reason leads the group's (_lost_gpu_first)."""
    lost = _lost_gpu(outcomes)
    if lost is not None:
        return f" after rank {lost.rank} failed"
    failed = [outcomes[r] for r in sorted(outcomes) if isinstance(outcomes[r], Failed)]
    if not failed:
        return ""
    error = failed[0].error
    return f" after rank {failed[0].rank} failed ({type(error).__name__}: {error})"


def _lost_gpu(outcomes: dict[int, Outcome]) -> Failed | None:
    """The first rank's answer that says its GPU failed for good, if any."""
    lost = [o for _, o in sorted(outcomes.items()) if isinstance(o, Failed) and o.device_lost]
    return lost[0] if lost else None


def _gpu_lost_text(lost: Failed) -> str:
    return f"rank {lost.rank}'s GPU failed for good ({lost.device_lost})"


def _lost_gpu_first(outcomes: dict[int, Outcome], unfinished: str) -> str:
    """Why the group stops for ranks that did not finish: a GPU lost for good first, if a
    rank's was, since the operator must replace it or restart the machine, whereas stuck
    ranks alone read as a hang in the software; the ranks it left waiting follow."""
    lost = _lost_gpu(outcomes)
    if lost is None:
        return f"{unfinished}: stuck"
    return f"{_gpu_lost_text(lost)}; {unfinished}: stuck"


def _output(outcomes: dict[int, Outcome]) -> Path:
    failed = [outcomes[r] for r in sorted(outcomes) if isinstance(outcomes[r], Failed)]
    if failed:
        raise _error(failed[0])
    done = outcomes[0]
    if not isinstance(done, Done) or done.output is None:
        raise RuntimeError(f"rank 0 reported {done} instead of a video")
    return done.output


def _error(failed: Failed) -> Exception:
    """What the user sees: the error itself where it is theirs or rank 0's."""
    if isinstance(failed.error, InputError) or failed.rank == 0:
        return failed.error
    return RuntimeError(f"rank {failed.rank}: {type(failed.error).__name__}: {failed.error}")


def _exit_text(exited: RankExited) -> str:
    code = exited.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # the real-time signals but the first and last have no name
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


@dataclass(frozen=True)
class _InboxFailed:
    """The inbox's thread failed: nothing more will be read from the ranks."""

    failure: str


class _Handout:
    """A command for some ranks: the outbox sends it to every one of them, or to none."""

    def __init__(self, message: Render | Check, conns: list[Connection]):
        self.message, self.conns = message, conns
        self.sent: bool | None = None  # None until the outbox has sent or withdrawn it
        self.error: Exception | None = None
        self.settled = threading.Event()


class _Outbox:
    """The ranks' commands, sent by a thread of their own.

    Cog cancels by raising CancelationException in the prediction thread at any bytecode
    (PyThreadState_SetAsyncExc), and no Python code can hold it off there. Had that thread
    sent a Render rank by rank, a cancel between two sends would leave rank 0 rendering a
    request the others never got: it would wait for them in its first collective, rank 1
    would join it there with the next request, and from then on every prediction would
    return the video of the one before, made of two requests. So the prediction thread only
    queues a handout, with one call into C (SimpleQueue.put) that the exception cannot
    split: it is queued or it is not. This thread, which Cog never interrupts, sends it to
    every rank, each message whole.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="rank-outbox", daemon=True).start()

    def send(self, handout: _Handout) -> None:
        """Queue the handout and wait until every rank it is for has it."""
        self._queue.put((handout, True))
        self._wait(handout)
        if handout.error is not None:
            raise handout.error

    def settle(self, handout: _Handout) -> bool:
        """After a cancel in send(): True if every rank the handout is for has it, False if
        none ever will. Queued behind the handout, if send() queued it, so this thread has
        sent it by then; if not, it withdraws it."""
        self._queue.put((handout, False))
        self._wait(handout)
        return bool(handout.sent)

    def close(self) -> None:
        self._queue.put((None, False))

    @staticmethod
    def _wait(handout: _Handout) -> None:
        while not handout.settled.wait(POLL_S):  # in slices, so that a cancel lands
            pass

    def _serve(self) -> None:
        while True:
            handout, send = self._queue.get()
            if handout is None:
                return
            if handout.sent is None:
                handout.sent = send and self._send_all(handout)
            handout.settled.set()

    @staticmethod
    def _send_all(handout: _Handout) -> bool:
        """Whether the ranks have it: a message that does not pickle fails at the first."""
        try:
            for conn in handout.conns:
                with contextlib.suppress(OSError):  # a rank that ended: the inbox reports it
                    conn.send(handout.message)
        except Exception as error:
            handout.error = error
            return False
        return True


class _Inbox:
    """Every rank's messages and exits, read by one thread into one queue.

    The prediction thread never reads a pipe itself (nor writes one: _Outbox): Cog cancels
    by raising an exception in that thread at any bytecode, which could cut a message in
    half. It takes the next item with next(), handles it, then calls done(): a cancel in
    between handles an item twice (a log line twice) rather than losing it.
    """

    def __init__(
        self,
        processes: list[multiprocessing.Process],
        conns: list[Connection],
        on_exit: Callable[[RankExited], None],
        on_failure: Callable[[str], None],
    ):
        self._on_exit, self._on_failure = on_exit, on_failure
        self._items: collections.deque = collections.deque()
        self._arrived = threading.Event()
        self._processes, self._conns = processes, conns
        self._watched: dict = {conn: rank for rank, conn in enumerate(conns)}
        self._watched.update({p.sentinel: rank for rank, p in enumerate(processes)})
        self._closed = False
        # Held while a thread reaps a rank: of two waitpid()s at once, the one that finds the
        # process already reaped leaves it looking alive (multiprocessing's Popen.poll).
        self.reaping = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="rank-inbox", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        """Everything the ranks send, and their ends, until closed. Should it fail, the group
        is told and a waiting prediction woken: otherwise it would wait forever, and the
        health check pass."""
        try:
            self._read_until_closed()
        except Exception as error:
            failure = f"the thread reading the ranks failed ({error!r})"
            log.exception(failure)
            self._on_failure(failure)
            self._put(_InboxFailed(failure))

    def _read_until_closed(self) -> None:
        while self._watched and not self._closed:
            for source in wait(list(self._watched), timeout=0.5):
                if source not in self._watched:  # a pipe already drained below
                    continue
                rank = self._watched[source]
                if isinstance(source, Connection):
                    self._receive(source)
                    continue
                del self._watched[source]
                # What the rank sent before it ended (its SetupFailed, say) comes first.
                while self._conns[rank] in self._watched and self._conns[rank].poll(0):
                    self._receive(self._conns[rank])
                with self.reaping:
                    self._processes[rank].join(timeout=1)
                    exited = RankExited(rank, self._processes[rank].exitcode)
                self._on_exit(exited)
                self._put(exited)

    def _receive(self, conn: Connection) -> None:
        try:
            self._put(conn.recv())
        except (EOFError, OSError):  # the rank ended: its sentinel says how
            del self._watched[conn]

    def _put(self, item) -> None:
        self._items.append(item)
        self._arrived.set()

    def next(self, timeout: float | None):
        """The oldest item not yet done(), waiting up to `timeout` seconds; None if none."""
        if not self._items:
            self._arrived.clear()
            if not self._items:
                self._arrived.wait(timeout)
        return self._items[0] if self._items else None

    def done(self) -> None:
        self._items.popleft()

    def close(self) -> None:
        self._closed = True
