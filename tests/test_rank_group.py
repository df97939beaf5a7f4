"""How the worker waits for its rank processes' answers (parallel/group.py), with real
processes and pipes standing in for ranks that answer late; and what ranks tell each other
(parallel/ranks.py), over gloo."""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import json
import logging
import multiprocessing
import os
import pickle
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from cog import CancelationException

from cogvideox_cog import generator as generator_module
from cogvideox_cog.devtools.tiny_postprocess import save_tiny_realesrgan, tiny_rrdbnet
from cogvideox_cog.errors import InputError, LoraError, RankGroupError, WeightsError
from cogvideox_cog.generator import Request
from cogvideox_cog.parallel import group
from cogvideox_cog.parallel import ranks as rank_processes
from cogvideox_cog.parallel.protocol import (
    Canceled,
    Check,
    Done,
    Failed,
    LogLine,
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
from cogvideox_cog.parallel.ranks import (
    LoraFetchedOnce,
    ReportedProgress,
    _forward_logs,
    postprocessor_of,
    rendezvous_store,
)
from cogvideox_cog.postprocess import (
    INTERPOLATE_ENV,
    UPSCALE_ENV,
    UPSCALE_URL_ENV,
    Postprocessor,
    Steps,
)
from cogvideox_cog.weights.cache import WEIGHTS_DIR_ENV
from tests.parallel_ranks import join_ranks, spawn_ranks

BOUND_S = 0.5
REQUEST = Request("a panda plays guitar", "", 9, 2, 6.0, None, None, seed=5)
PROGRESS_EVERY_S = 0.1
HUNG_S = 20 * BOUND_S  # when a hung rank answers: past every bound here


def _answer_after(
    conn, delay: float | None, answer, said_first: tuple = (), progress_s: float = 0.0
) -> None:
    if delay is None:  # answers each command it is sent, as a rank does
        while True:
            conn.recv()
            conn.send(answer)
    for message in said_first:
        conn.send(message)
    working_until = time.monotonic() + progress_s
    while time.monotonic() < working_until:  # inside a step, as rank 0's block hooks
        conn.send(Progress())
        time.sleep(PROGRESS_EVERY_S)
    time.sleep(delay)
    conn.send(answer)
    time.sleep(30)  # stays alive, as a rank does between requests


@contextmanager
def _group_answering(
    answers: list[tuple[float | None, object]],
    rank_0_first: tuple = (),
    rank_0_progress_s: float = 0.0,
    reading: tuple[int, ...] = (),
    rank_main: Callable | None = None,
) -> Iterator[group.RankGroup]:
    """A RankGroup whose rank r sends answers[r][1] after answers[r][0] seconds (None: in
    answer to each command it gets); the `reading` ranks first say Reading, and rank 0 then
    sends `rank_0_first` at once, then Progress every PROGRESS_EVERY_S for
    `rank_0_progress_s` (its delay counts from then). With `rank_main`, each rank runs
    rank_main(conn, rank) instead. Its processes are stopped on the way out."""
    context = multiprocessing.get_context("fork")
    ranks = group.RankGroup.__new__(group.RankGroup)
    ranks.world_size, ranks.failure, ranks._closing = len(answers), None, False
    ranks._cancel = context.Event()
    ranks._processes, ranks._conns = [], []
    ranks._steps, ranks._progressed, ranks._reading = group._StepClock(), None, {}
    ranks._unsettled = None
    for rank, (delay, answer) in enumerate(answers):
        ours, theirs = context.Pipe()
        said_first, progress_s = (rank_0_first, rank_0_progress_s) if rank == 0 else ((), 0.0)
        said_first = ((Reading(rank),) if rank in reading else ()) + said_first
        process = context.Process(
            target=_answer_after, args=(theirs, delay, answer, said_first, progress_s)
        )
        if rank_main is not None:
            process = context.Process(target=rank_main, args=(theirs, rank))
        process.start()
        theirs.close()
        ranks._processes.append(process)
        ranks._conns.append(ours)
    ranks._inbox = group._Inbox(ranks._processes, ranks._conns, ranks._rank_ended, ranks._failed)
    ranks._outbox = group._Outbox()
    try:
        yield ranks
    finally:
        ranks.close(ask=False)


def test_rank_0_working_alone_after_the_others_stopped_is_waited_for_past_the_bound():
    """Its decode and encode (a 4x upscaled video) can outlast the cancel bound; the others
    are out of every collective, so it is slow, not stuck."""
    outcomes = {}
    with _group_answering([(3 * BOUND_S, Done(0, None)), (0.0, Canceled(1, 2))]) as ranks:
        ranks._outcomes(outcomes, bound=BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_another_rank_late_past_the_bound_stops_the_group_as_stuck():
    answers = [(0.0, Canceled(0, 2)), (30.0, Canceled(1, 2))]
    stuck = r"ranks \[1\] did not finish within \d+ s: stuck"
    with _group_answering(answers) as ranks, pytest.raises(RankGroupError, match=stuck):
        ranks._outcomes({}, bound=BOUND_S)
    assert "stuck" in ranks.failure


def test_a_step_slower_than_the_bound_is_waited_for_after_a_cancel():
    """On slower GPUs, or with offloaded weights, a step of a large video can outlast the
    bound: the ranks are at work, and stop when that step ends."""
    step = 3 * BOUND_S
    answers = [(step, Canceled(0, 1)), (step, Canceled(1, 1))]
    outcomes = {}
    with _group_answering(answers, rank_0_first=(StepEnded(step),)) as ranks:
        ranks._outcomes(outcomes, bound=BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_ranks_silent_past_twice_their_longest_step_are_stuck():
    answers = [(30.0, Canceled(0, 1)), (30.0, Canceled(1, 1))]
    stuck = r"ranks \[0, 1\] did not finish"
    with (
        _group_answering(answers, rank_0_first=(StepEnded(BOUND_S),)) as ranks,
        pytest.raises(RankGroupError, match=stuck),
    ):
        ranks._outcomes({}, bound=BOUND_S)
    assert "stuck" in ranks.failure


def test_a_first_step_slower_than_the_bound_is_waited_for_while_rank_0_reports_progress():
    """A cancel soon after the request was sent: no step has ended yet to say how long one
    takes, and the first step of a large video (or with offloaded weights) can outlast the
    bound. Rank 0 says it is still at work as the step goes on."""
    step = 3 * BOUND_S
    answers = [(0.0, Canceled(0, 0)), (step, Canceled(1, 0))]
    outcomes = {}
    with _group_answering(answers, rank_0_progress_s=step) as ranks:
        ranks._outcomes(outcomes, bound=BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_ranks_silent_past_the_bound_after_rank_0_last_reported_progress_are_stuck():
    """Ranks stuck in a collective make no progress: rank 0's Progress stops, and the wait
    ends the bound after the last one."""
    answers = [(30.0, Canceled(0, 0)), (30.0, Canceled(1, 0))]
    stuck = r"ranks \[0, 1\] did not finish within \d+ s: stuck"
    with (
        _group_answering(answers, rank_0_progress_s=2 * BOUND_S) as ranks,
        pytest.raises(RankGroupError, match=stuck),
    ):
        ranks._outcomes({}, bound=BOUND_S)
    assert "stuck" in ranks.failure


def test_ranks_left_waiting_by_a_rank_that_failed_alone_are_reported_with_its_error(
    monkeypatch,
):
    """An error on one GPU only (out of memory, say) leaves the others in a collective: the
    prediction's error and the health check say which rank failed and why."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    oom = Failed(0, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    answers = [(0.0, oom), (30.0, Canceled(1, 2))]
    with _group_answering(answers) as ranks, pytest.raises(RankGroupError) as stopped:
        ranks._outcomes({})
    said = "after rank 0 failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB)"
    assert said in str(stopped.value) and said in ranks.failure
    assert str(stopped.value).startswith("ranks [1] did not finish within")


def test_a_rank_still_reading_a_long_clip_after_another_refused_it_is_waited_for(monkeypatch):
    """Rank 1 refused the clip (too short) while rank 0 was still decoding it, which the decode
    limits let take longer than the failure's grace: rank 0 was taken for stuck and the group
    stopped, for an input every rank refuses alike."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    short = InputError("video is too short")
    answers = [(3 * BOUND_S, Failed(0, short)), (0.0, Failed(1, short))]
    outcomes = {}
    with _group_answering(answers, rank_0_first=(Reading(0),)) as ranks:
        ranks._outcomes(outcomes)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_a_rank_past_its_inputs_is_held_to_the_failures_grace(monkeypatch):
    """Once it has read them it meets the others in collectives, where it can be stuck."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    answers = [(30.0, Done(0, None)), (0.0, Failed(1, RuntimeError("out of memory")))]
    with (
        _group_answering(answers, rank_0_first=(Reading(0), Read(0))) as ranks,
        pytest.raises(RankGroupError, match=r"ranks \[0\] did not finish"),
    ):
        ranks._outcomes({})


@pytest.mark.parametrize(
    "error",
    [InputError("prompt: too long"), LoraError("the LoRA changes layers this layout splits")],
    ids=lambda error: type(error).__name__,
)
def test_an_input_another_rank_refuses_reaches_the_user_as_its_own_error(error):
    """The user's to fix, so shown as it is: not as a failure of rank 1."""
    answers = [(None, Done(0, None)), (None, Failed(1, error))]
    with _group_answering(answers) as ranks, pytest.raises(type(error)) as raised:
        ranks.predict(REQUEST)
    assert str(raised.value) == str(error)


def test_ranks_hung_reading_their_inputs_after_a_cancel_are_stuck(monkeypatch):
    """A clip that hangs the decoder (or a file whose read blocks) holds every rank before its
    first step, where the cancel flag would be read. A read longer than a collective may wait
    has hung: the cancel ends and the health check fails, rather than the server staying
    busy for good."""
    monkeypatch.setattr(group, "collective_timeout", lambda: timedelta(seconds=BOUND_S))
    answers = [(HUNG_S, Canceled(0, 0)), (HUNG_S, Canceled(1, 0))]
    stuck = r"ranks \[0, 1\] did not finish reading the inputs within \d+ s: stuck"
    with (
        _group_answering(answers, reading=(0, 1)) as ranks,
        pytest.raises(RankGroupError, match=stuck),
    ):
        ranks._outcomes({}, bound=BOUND_S)
    assert "stuck" in ranks.failure


def test_a_rank_hung_reading_its_inputs_after_another_refused_them_is_stuck(monkeypatch):
    """Rank 1 refused the clip; rank 0, reading it for longer than a collective may wait, has
    hung and will never refuse it."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    monkeypatch.setattr(group, "collective_timeout", lambda: timedelta(seconds=BOUND_S))
    short = InputError("video is too short")
    answers = [(HUNG_S, Failed(0, short)), (0.0, Failed(1, short))]
    stuck = r"ranks \[0\] did not finish reading the inputs within \d+ s: stuck"
    with (
        _group_answering(answers, reading=(0,)) as ranks,
        pytest.raises(RankGroupError, match=stuck),
    ):
        ranks._outcomes({})


def test_a_rank_still_reading_a_long_clip_after_a_cancel_is_waited_for_past_the_bound():
    """The ranks read the cancel flag after a step, past the inputs: one reading a long clip
    then stops after its first step, as the others do."""
    answers = [(3 * BOUND_S, Canceled(0, 0)), (3 * BOUND_S, Canceled(1, 0))]
    outcomes = {}
    with _group_answering(answers, reading=(0, 1)) as ranks:
        ranks._outcomes(outcomes, bound=BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_a_rank_that_read_its_inputs_waits_for_one_still_reading_after_a_cancel():
    """Rank 0 has read the clip and waits for rank 1 in the first collective; rank 1, slower
    (its share of the CPUs), still reads it. Neither is stuck: rank 1 reaches the step, and
    both stop after it. Only ranks all still reading were waited for: the group stopped as
    `ranks [0, 1] ... stuck`, naming rank 0, which only waited."""
    answers = [(3 * BOUND_S, Canceled(0, 0)), (3 * BOUND_S, Canceled(1, 0))]
    outcomes = {}
    with _group_answering(answers, rank_0_first=(Read(0),), reading=(0, 1)) as ranks:
        ranks._outcomes(outcomes, bound=BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_a_rank_hung_reading_its_inputs_is_named_alone_not_the_rank_waiting_for_it(monkeypatch):
    monkeypatch.setattr(group, "collective_timeout", lambda: timedelta(seconds=BOUND_S))
    answers = [(HUNG_S, Canceled(0, 0)), (HUNG_S, Canceled(1, 0))]
    stuck = r"ranks \[1\] did not finish reading the inputs within \d+ s: stuck"
    with (
        _group_answering(answers, rank_0_first=(Read(0),), reading=(0, 1)) as ranks,
        pytest.raises(RankGroupError, match=stuck),
    ):
        ranks._outcomes({}, bound=BOUND_S)


def test_a_rank_failing_alone_asks_the_others_to_stop(monkeypatch):
    """The others may wait for it in a collective: they are told to stop at their next step."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    answers = [(0.0, Failed(0, RuntimeError("out of memory"))), (0.2, Canceled(1, 2))]
    with _group_answering(answers) as ranks:
        ranks._outcomes({})
        assert ranks._cancel.is_set()


def test_a_rank_failing_during_a_cancel_wait_leaves_the_others_the_cancel_bound(monkeypatch):
    """After a cancel every rank is already told to stop, and has the cancel's bound to do it
    in: one that fails meanwhile does not cut the others' wait to the shorter failure grace
    (a step under way would be taken for stuck, and the server turned UNHEALTHY)."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    answers = [(0.0, Failed(0, RuntimeError("out of memory"))), (3 * BOUND_S, Canceled(1, 2))]
    outcomes = {}
    with _group_answering(answers) as ranks:
        ranks._outcomes(outcomes, bound=6 * BOUND_S)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_rank_0_left_alone_after_another_rank_failed_is_not_taken_for_working_alone():
    """Rank 1's failure (out of memory on its GPU) leaves rank 0 waiting for it in a
    collective: stuck, not decoding on its own, so the wait has its bound."""
    failed = {1: Failed(1, RuntimeError("CUDA out of memory"))}
    assert not group._working_alone([0], failed)


def test_a_check_waits_for_rank_0_alone():
    """Only rank 0 checks a request: the others, never asked, are not waited for."""
    with _group_answering([(0.0, Done(0, None)), (30.0, Canceled(1, 0))]) as ranks:
        started = time.monotonic()
        ranks.check(REQUEST)
        waited = time.monotonic() - started
    assert waited < 10.0 and ranks.failure is None


def _refuse_the_clip_then_hang_in_a_check(conn, rank: int) -> None:
    """A rank that refuses a render's clip while reading it (so it never says Read), and
    answers a check only after HUNG_S."""
    while True:
        command = conn.recv()
        if isinstance(command, Check):
            time.sleep(HUNG_S)
            conn.send(Done(rank, None))
        else:
            conn.send(Reading(rank))
            conn.send(Failed(rank, InputError("video: too short")))


def _cancel_in(thread: threading.Thread) -> None:
    """As Cog cancels a prediction: CancelationException raised in its thread."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(CancelationException)
    )


def _on_a_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """call() on a thread of its own, as Cog's worker runs a prediction, so that a hang fails
    the test instead of hanging it; the list gets what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


def _canceled_check(ranks: group.RankGroup) -> list[BaseException]:
    """What ranks.check(REQUEST) raised, canceled as Cog cancels it soon after it began;
    empty if it still runs HUNG_S later."""
    checking, outcome = _on_a_thread(lambda: ranks.check(REQUEST))
    time.sleep(BOUND_S / 5)
    _cancel_in(checking)
    checking.join(HUNG_S)
    return outcome


def test_a_canceled_check_is_held_to_the_bound_whatever_an_earlier_render_read(monkeypatch):
    """The ranks refused a clip while reading it, so that render left them marked as
    reading. A check reads no inputs: rank 0, hung in one after a cancel, is stuck once the
    cancel's bound has passed. Taken for still reading the render's clip, it was waited for
    as long as a collective may wait (30 minutes or more), then reported as stuck reading."""
    monkeypatch.setattr(group, "CANCEL_BOUND_S", BOUND_S)
    monkeypatch.setattr(group, "collective_timeout", lambda: timedelta(seconds=4 * BOUND_S))
    answers = [(None, None), (None, None)]
    with _group_answering(answers, rank_main=_refuse_the_clip_then_hang_in_a_check) as ranks:
        with pytest.raises(InputError, match="too short"):
            ranks.predict(REQUEST)
        outcome = _canceled_check(ranks)
    assert len(outcome) == 1 and isinstance(outcome[0], RankGroupError)
    assert re.fullmatch(r"ranks \[0\] did not finish within \d+ s: stuck", str(outcome[0]))


def test_a_canceled_check_stuck_on_rank_0_names_rank_0_alone(monkeypatch):
    """Only rank 0 was asked: rank 1, idle, has nothing to finish. The stuck message listed
    it too, and sent the operator to look at a GPU that was never in the check."""
    monkeypatch.setattr(group, "CANCEL_BOUND_S", BOUND_S)
    with _group_answering([(HUNG_S, Done(0, None)), (None, Done(1, None))]) as ranks:
        outcome = _canceled_check(ranks)
        assert len(outcome) == 1 and isinstance(outcome[0], RankGroupError)
        stuck = r"ranks \[0\] did not finish within \d+ s: stuck"
        assert re.fullmatch(stuck, str(outcome[0]))
        assert re.fullmatch(stuck, ranks.failure)


def test_a_check_leaves_the_other_ranks_nothing_to_answer_for_the_next_render():
    """Had rank 1 checked too, its answer would be read as its outcome of the next render:
    a bad input's error failing the next, good request."""
    refused = Failed(1, InputError("prompt: too long"))
    with _group_answering([(0.0, Done(0, None)), (None, refused)]) as ranks:
        ranks.check(REQUEST)
        time.sleep(BOUND_S)  # rank 1's answer, had it been asked, is in by then
        assert ranks._inbox.next(timeout=0) is None


def test_rank_0s_log_lines_are_logged_by_the_prediction(caplog):
    said = (LogLine(logging.INFO, "lora: loaded style.safetensors"),)
    with (
        _group_answering([(0.0, Done(0, None))], rank_0_first=said) as ranks,
        caplog.at_level(logging.INFO, logger="cogvideox_cog"),
    ):
        ranks._outcomes({})
    assert "lora: loaded style.safetensors" in caplog.text


def test_a_rank_killed_during_a_prediction_fails_it_at_once_naming_the_kill(monkeypatch):
    """Not once the others are taken for stuck (they fail, or wait in a collective for the
    dead rank): the prediction's error says what happened."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", 4 * BOUND_S)
    monkeypatch.setattr(group, "CANCEL_BOUND_S", 4 * BOUND_S)
    broken = Failed(0, RuntimeError("Connection closed by peer"))
    with _group_answering([(2 * BOUND_S, broken), (30.0, Done(1, None))]) as ranks:
        threading.Timer(BOUND_S, ranks._processes[1].kill).start()
        killed = "rank 1 was killed by SIGKILL during a prediction"
        with pytest.raises(RankGroupError, match=killed):
            ranks.predict(REQUEST)


def test_a_rank_killed_by_a_signal_without_a_name_fails_the_group_at_once():
    """Python names only the first and last real-time signals: describing signal 35 raised
    in the thread that reads the ranks, which ended, and the next prediction waited forever
    while the health check passed."""
    with _group_answering([(None, Done(0, None)), (None, Done(1, None))]) as ranks:
        os.kill(ranks._processes[1].pid, 35)
        deadline = time.monotonic() + 10
        while ranks.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RankGroupError, match="rank 1 was killed by signal 35"):
            ranks.healthcheck()
        with pytest.raises(RankGroupError, match="rank 1 was killed by signal 35"):
            ranks.predict(REQUEST)


class _Unreadable:
    """Sent by a rank, it fails to unpickle in the parent."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def _refuse_to_unpickle():
    raise ValueError("this message cannot be read")


def test_a_message_that_cannot_be_read_fails_the_prediction_instead_of_hanging_it():
    """Rank 0 answers the render with it, so the prediction is already waiting when the
    thread reading the ranks fails; it runs on a thread of its own, so that a hang fails."""
    with _group_answering([(None, _Unreadable()), (30.0, Done(1, None))]) as ranks:
        prediction, raised = _on_a_thread(lambda: ranks.predict(REQUEST))
        prediction.join(timeout=10)
        assert not prediction.is_alive(), "the prediction still waits"
        assert "the thread reading the ranks failed" in str(raised[0])
        with pytest.raises(RankGroupError, match="cannot be read"):
            ranks.healthcheck()


def test_a_message_that_cannot_be_read_between_predictions_fails_the_health_check():
    """No prediction is waiting to be woken: the group itself is told."""
    with _group_answering([(0.0, _Unreadable())]) as ranks:
        deadline = time.monotonic() + 10
        while ranks.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RankGroupError, match="the thread reading the ranks failed"):
            ranks.healthcheck()


def test_a_rank_whose_gpu_failed_for_good_stops_the_group_and_fails_the_health_check():
    """CUDA keeps an illegal memory access for the life of the process: that rank would fail
    every later request, so the group stops and the worker is restarted."""
    sticky = "CUDA error: an illegal memory access was encountered"
    lost = Failed(1, torch.AcceleratorError(sticky), device_lost=sticky)
    with _group_answering([(None, Canceled(0, 1)), (None, lost)]) as ranks:
        said = "rank 1's GPU failed for good (CUDA error: an illegal memory access"
        with pytest.raises(RankGroupError, match=re.escape(said)):
            ranks.predict(REQUEST)
        with pytest.raises(RankGroupError, match=re.escape(said)):
            ranks.healthcheck()


def test_a_rank_that_found_its_gpu_lost_after_another_error_stops_the_group():
    """A kernel's fault first surfaced as a cuBLAS failure; the rank's synchronize then raised
    the error CUDA kept (errors.device_lost_reason), and its Failed says so."""
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`")
    reason = "RuntimeError first, then on synchronizing: CUDA error: an illegal memory access"
    lost = Failed(1, cublas, device_lost=reason)
    said = re.escape(f"rank 1's GPU failed for good ({reason})")
    with _group_answering([(None, Canceled(0, 1)), (None, lost)]) as ranks:
        with pytest.raises(RankGroupError, match=said):
            ranks.predict(REQUEST)
        with pytest.raises(RankGroupError, match=said):
            ranks.healthcheck()


def test_a_rank_whose_gpu_failed_for_good_while_rank_0_waits_for_it_names_the_lost_gpu(
    monkeypatch,
):
    """Rank 1's kernel faulted while rank 0 waits for it in a collective, past the failure's
    grace: the group stopped as stuck ranks, quoting rank 1's error as a software hang's
    cause, and the operator did not read that the GPU needs replacing."""
    monkeypatch.setattr(group, "FAILURE_GRACE_S", BOUND_S)
    sticky = "Triton Error [CUDA]: an illegal memory access was encountered"
    lost = Failed(1, RuntimeError(sticky), device_lost=sticky)
    said = f"rank 1's GPU failed for good ({sticky}); ranks [0] did not finish within "
    with _group_answering([(HUNG_S, Canceled(0, 1)), (0.0, lost)]) as ranks:
        with pytest.raises(RankGroupError) as failed:
            ranks.predict(REQUEST)
        assert str(failed.value).startswith(said)
        assert str(failed.value).endswith(" s after rank 1 failed: stuck")
        with pytest.raises(RankGroupError, match=f"^{re.escape(said)}"):
            ranks.healthcheck()
        with pytest.raises(RankGroupError, match=f"^cannot predict: {re.escape(said)}"):
            ranks.predict(REQUEST)


def test_a_rank_out_of_gpu_memory_is_not_taken_for_a_lost_gpu():
    oom = Failed(1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with _group_answering([(None, Canceled(0, 1)), (None, oom)]) as ranks:
        with pytest.raises(RuntimeError, match="rank 1: OutOfMemoryError"):
            ranks.predict(REQUEST)
        assert ranks.healthcheck() is True


def test_the_group_keeps_the_first_reason_it_stopped_for():
    """A rank killed leaves the others stuck: the health check names the kill, the cause."""
    with _group_answering([(30.0, Done(0, None))]) as ranks:
        ranks.failure = "rank 1 was killed by SIGKILL"
        with pytest.raises(RankGroupError, match="stuck"):
            ranks._break("ranks [0] did not finish within 30 s: stuck")
    assert ranks.failure == "rank 1 was killed by SIGKILL"


def test_the_health_check_names_the_first_rank_that_ended():
    """Rank 1 killed (the OOM killer), then rank 0 ending too, its collective broken: the
    cause is the kill."""
    ranks = group.RankGroup.__new__(group.RankGroup)
    ranks.failure, ranks._closing = None, False
    ranks._rank_ended(RankExited(1, -9))
    ranks._rank_ended(RankExited(0, 1))
    assert ranks.failure == "rank 1 was killed by SIGKILL"


def test_ranks_that_ignore_sigterm_are_killed_when_the_group_stops():
    """A rank inherits an ignored SIGTERM from the process that starts it: stopping the
    group must not leave it running, holding its GPU's memory."""
    ignored = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _group_answering([(30.0, Done(0, None))]) as ranks:
            pass
    finally:
        signal.signal(signal.SIGTERM, ignored)
    assert not ranks._processes[0].is_alive()


def test_the_health_check_fails_with_the_reason_once_the_group_stopped():
    ranks = group.RankGroup.__new__(group.RankGroup)
    ranks.failure = "rank 1 was killed by SIGKILL"
    with pytest.raises(RankGroupError, match="rank 1 was killed by SIGKILL"):
        ranks.healthcheck()


def test_a_step_is_waited_for_twice_as_long_as_the_longest_so_far():
    clock = group._StepClock()
    clock.ended(10.0)
    before = time.monotonic()
    clock.ended(1.0)  # a shorter step after it: the longest still counts
    after = time.monotonic()
    assert before + 20.0 <= clock.extended(0.0) <= after + 20.0


def test_ranks_are_waited_for_one_bound_past_rank_0s_last_progress():
    """Stuck ranks are stopped the bound after rank 0 fell silent, not later."""
    ranks = group.RankGroup.__new__(group.RankGroup)
    ranks._steps, ranks._progressed = group._StepClock(), time.monotonic()
    bound = group.CANCEL_BOUND_S
    assert ranks._extended(0.0, bound) == ranks._progressed + bound


def test_a_rank_ended_before_its_setup_began_fails_setup_naming_its_end():
    """It began no step (killed as it started): no rank is behind it, and comparing the
    others' steps with none must not fail the setup's wait itself."""
    assert _setup_failure({1: (ABORT,)}, 2) == "rank 1 was killed by SIGABRT during setup"


def test_a_check_rank_0_refused_raises_its_input_error():
    refused = Failed(0, InputError("prompt: too long"))
    with (
        _group_answering([(None, refused), (None, Done(1, None))]) as ranks,
        pytest.raises(InputError, match="too long"),
    ):
        ranks.check(REQUEST)


def _answer_with_the_seed(conn, rank: int) -> None:
    """A rank that says which seed each render came with, then renders it."""
    while True:
        seed = conn.recv().request.seed
        conn.send(LogLine(logging.INFO, f"rank {rank} seed {seed}"))
        conn.send(Done(rank, Path("video.mp4") if rank == 0 else None))


def test_a_render_without_a_seed_reaches_every_rank_with_the_same_drawn_seed(caplog):
    """Ranks that each drew their own would split one step over different noise."""
    with (
        _group_answering([(None, None)] * 2, rank_main=_answer_with_the_seed) as ranks,
        caplog.at_level(logging.INFO, logger="cogvideox_cog"),
    ):
        ranks.predict(replace(REQUEST, seed=None))
    said = [r.getMessage().split() for r in caplog.records if " seed " in r.getMessage()]
    assert sorted(words[1] for words in said) == ["0", "1"]
    assert len({words[3] for words in said}) == 1 and said[0][3].isdigit()


def test_rank_0_and_another_rank_silent_past_the_bound_are_stuck():
    """Of three ranks only rank 1 stopped: rank 2 has not, so rank 0 is not working alone
    past every collective, and both are held to the bound."""
    answers = [(HUNG_S, Canceled(0, 2)), (0.0, Canceled(1, 2)), (HUNG_S, Canceled(2, 2))]
    stuck = r"ranks \[0, 2\] did not finish within \d+ s: stuck"
    with _group_answering(answers) as ranks, pytest.raises(RankGroupError, match=stuck):
        ranks._outcomes({}, bound=BOUND_S)


def _exit_when_told_to_stop(conn, rank: int) -> None:
    """A rank between requests: it ends on its own when told to stop, as ranks.serve does."""
    while conn.recv() is not None:
        pass
    os._exit(0)


def test_closing_the_group_asks_each_rank_to_stop_before_terminating_it():
    with _group_answering([(None, None)] * 2, rank_main=_exit_when_told_to_stop) as ranks:
        ranks.close()
        assert [process.exitcode for process in ranks._processes] == [0, 0]


def test_ranks_left_waiting_after_two_failed_name_the_lowest_rank_as_the_prediction_does():
    """The stuck message and the prediction's error (_output) name the same rank."""
    outcomes = {2: Failed(2, RuntimeError("peer gone")), 1: Failed(1, RuntimeError("oom"))}
    assert group._after_failure(outcomes) == " after rank 1 failed (RuntimeError: oom)"


def test_a_render_reaches_the_ranks_still_running_when_another_just_ended():
    """The outbox sends every rank its copy; the inbox, not a failed send, reports the end."""
    with _group_answering([(None, Done(0, None)), (None, Done(1, None))]) as ranks:
        ranks._processes[0].kill()
        ranks._processes[0].join()
        handout = group._Handout(Render(REQUEST), ranks._conns)
        ranks._outbox.send(handout)
        answered, deadline = [], time.monotonic() + HUNG_S
        while Done(1, None) not in answered and time.monotonic() < deadline:
            answered.append(ranks._inbox.next(timeout=group.POLL_S))
            if answered[-1] is not None:
                ranks._inbox.done()
        assert handout.sent and Done(1, None) in answered


def _say_then_ready(conn, rank: int) -> None:
    conn.send(LogLine(logging.INFO, f"setup: rank {rank} loaded the model"))
    conn.send(Ready(rank))
    time.sleep(30)


def test_the_ranks_setup_log_lines_are_logged_by_the_worker(caplog):
    with (
        _group_answering([(None, None)] * 2, rank_main=_say_then_ready) as ranks,
        caplog.at_level(logging.INFO, logger="cogvideox_cog"),
    ):
        ranks._await_ready()
    assert "setup: rank 1 loaded the model" in caplog.text


def test_the_prediction_after_a_canceled_one_finds_nothing_left_to_stop(caplog):
    answers = [(BOUND_S, Canceled(0, 1)), (BOUND_S, Canceled(1, 1))]
    with _group_answering(answers) as ranks:
        prediction, outcome = _on_a_thread(lambda: ranks.predict(REQUEST))
        time.sleep(BOUND_S / 5)
        _cancel_in(prediction)
        prediction.join(HUNG_S)
        assert len(outcome) == 1 and isinstance(outcome[0], CancelationException)
        with caplog.at_level(logging.WARNING, logger=group.__name__):
            ranks._finish_unsettled()
    assert "still had a canceled request" not in caplog.text


class _FailingLoraCache:
    def get(self, url: str):
        raise LoraError("HTTP 403")


def _fetch_on_rank(rank: int, port: int, url: str, out) -> None:
    join_ranks(rank, port, 2, minutes=1)
    try:
        LoraFetchedOnce(_FailingLoraCache(), rank, torch.device("cpu")).get(url)
    except LoraError as error:
        (out / f"rank-{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_a_rank_told_that_rank_0_could_not_fetch_a_lora_quotes_no_signature(tmp_path):
    url = "https://bucket.example/style.safetensors?X-Amz-Signature=secret-signature"
    spawn_ranks(_fetch_on_rank, 2, url, tmp_path)
    said = (tmp_path / "rank-1.txt").read_text()
    assert said.startswith("rank 0 could not fetch lora_url https://bucket.example/style")
    assert "secret-signature" not in said


# What a request may ask of a deployment with upscale enabled (the tiny 4x Real-ESRGAN) and
# interpolate not: one choice per step accepted, one refused.
ASKED = (("none", "2x"), ("none", "4x"), ("2x", "none"))


def _postprocess_on_rank(rank: int, port: int, out: Path) -> None:
    join_ranks(rank, port, 2, minutes=1)
    try:
        postprocessor = postprocessor_of(rank, torch.device("cpu"))
        checked = {}
        for interpolate, upscale in ASKED:
            try:
                checked[f"{interpolate} {upscale}"] = repr(
                    postprocessor.check(interpolate, upscale)
                )
            except InputError as error:
                checked[f"{interpolate} {upscale}"] = f"InputError: {error}"
        models = [postprocessor.interpolator, postprocessor.upscaler]
        facts = {"models": sum(model is not None for model in models), "checked": checked}
        (out / f"rank-{rank}.json").write_text(json.dumps(facts))
        if rank == 0:
            frames = postprocessor.apply(
                _decoded(), 8, Steps(upscale=2), record_metric=lambda name, value: None
            ).array()
            np.save(out / "upscaled.npy", frames)
    finally:
        dist.destroy_process_group()


def _decoded() -> np.ndarray:
    return np.random.default_rng(0).random((2, 16, 24, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def postprocessing_ranks(tmp_path_factory) -> Path:
    """Two gloo ranks set up post-processing as the rank processes do, upscale enabled with
    the tiny Real-ESRGAN file and interpolate not: what each holds and checks, and rank 0's
    upscale of two frames."""
    out = tmp_path_factory.mktemp("postprocessing-ranks")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(UPSCALE_ENV, "1")
        env.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(out / "realesrgan.pth")))
        env.delenv(INTERPOLATE_ENV, raising=False)
        env.setenv(WEIGHTS_DIR_ENV, str(out / "weights"))
        spawn_ranks(_postprocess_on_rank, 2, out)
    return out


def _rank_facts(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank-{rank}.json").read_text())


def test_only_rank_0_loads_the_postprocessing_models(postprocessing_ranks):
    assert _rank_facts(postprocessing_ranks, 0)["models"] == 1
    assert _rank_facts(postprocessing_ranks, 1)["models"] == 0


def test_every_rank_checks_upscale_and_interpolate_as_rank_0(postprocessing_ranks):
    """Rank 0 alone checks a request before it is fetched, every rank once it renders: a
    step the deployment offers passes on both, one it does not is refused by both alike."""
    checked = _rank_facts(postprocessing_ranks, 1)["checked"]
    assert checked == _rank_facts(postprocessing_ranks, 0)["checked"]
    assert checked["none 4x"] == repr(Steps(upscale=4))
    assert "COGVIDEOX_INTERPOLATE=1" in checked["2x none"]


def test_rank_0_upscales_with_the_model_one_process_loads(postprocessing_ranks):
    upscaled = np.load(postprocessing_ranks / "upscaled.npy")
    alone = Postprocessor(upscaler=tiny_rrdbnet(), device=torch.device("cpu"))
    expected = alone.apply(_decoded(), 8, Steps(upscale=2), lambda name, value: None).array()
    np.testing.assert_array_equal(upscaled, expected)


class _Sent(list):
    """A rank's messages to the worker, kept here instead of going down a pipe."""

    def send(self, message) -> None:
        self.append(message)


@pytest.fixture
def forwarded_by_rank(monkeypatch) -> Iterator:
    """forwarded_by_rank(rank): what that rank's log forwarding sends the worker; the
    package's logger is put back afterwards."""
    logger = logging.getLogger("cogvideox_cog")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logger, "propagate", logger.propagate)

    def forwarded(rank: int) -> _Sent:
        sent = _Sent()
        _forward_logs(sent, rank)
        return sent

    return forwarded


def _warn_about_a_long_prompt() -> None:
    logging.getLogger("cogvideox_cog.generator").warning("prompt is longer than 226 tokens")


def test_other_ranks_leave_warnings_about_the_request_to_rank_0(forwarded_by_rank):
    """Every rank reads the same prompt, image or clip: the prediction's logs say what is
    wrong with them once, as on one GPU, not once a GPU."""
    rank_1 = forwarded_by_rank(1)
    _warn_about_a_long_prompt()
    logging.getLogger("cogvideox_cog.media.image").warning("its colour profile is broken")
    assert rank_1 == []


def test_rank_0_forwards_warnings_about_the_request(forwarded_by_rank):
    rank_0 = forwarded_by_rank(0)
    _warn_about_a_long_prompt()
    assert rank_0 == [LogLine(logging.WARNING, "prompt is longer than 226 tokens")]


def test_other_ranks_forward_their_own_warnings_marked_with_their_rank(forwarded_by_rank):
    rank_1 = forwarded_by_rank(1)
    logging.getLogger("cogvideox_cog.lora.slot").warning("lora: offload put back")
    assert rank_1 == [LogLine(logging.WARNING, "rank 1: lora: offload put back")]


def test_other_ranks_leave_their_info_lines_to_rank_0(forwarded_by_rank):
    """Every rank logs the same steps and loads: rank 0's lines alone are the prediction's."""
    rank_1 = forwarded_by_rank(1)
    logging.getLogger("cogvideox_cog.lora.slot").info("lora: loaded style.safetensors")
    assert rank_1 == []


def test_rank_0_reports_progress_at_most_once_each_interval():
    """Each block's start may say so; a 42-block step would send 42 messages a step."""
    sent = _Sent()
    transformer = torch.nn.Module()
    transformer.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    ReportedProgress(sent).install(transformer)
    for block in transformer.transformer_blocks:
        block(torch.zeros(1))
    assert sent == [Progress()]


class _UnpicklableError(Exception):
    """An error holding what no pipe carries (a lock, a decoder's handle)."""

    def __init__(self):
        super().__init__("the decoder's handle is gone")
        self.handle = threading.Lock()


class _GeneratorRaising:
    def check(self, request: Request) -> None:
        raise _UnpicklableError()


def test_a_ranks_error_that_cannot_be_pickled_reaches_the_worker_as_its_text():
    """The answer goes down a pipe: an error that does not pickle would end the rank there."""
    answer = rank_processes._check(_GeneratorRaising(), 1, Check(REQUEST))
    carried = pickle.loads(pickle.dumps(answer))
    assert isinstance(carried.error, RuntimeError)
    assert str(carried.error) == "_UnpicklableError: the decoder's handle is gone"


LOST = "Triton Error [CUDA]: an illegal memory access was encountered"  # Triton's launcher


def _raise_a_lost_gpu(module, args) -> None:
    raise RuntimeError(LOST)


def _serve_losing_rank_1s_gpu(rank, world_size, mode, port, conn, cancel) -> None:
    """ranks.serve, but rank 1's transformer fails as a Triton kernel on a lost GPU does:
    the fault the rank's real code then notes and logs (generator._noting_a_lost_device)."""
    if rank == 1:
        set_up = rank_processes._set_up

        def set_up_to_fail(*args):
            generator = set_up(*args)
            generator.pipe.transformer.register_forward_pre_hook(_raise_a_lost_gpu)
            return generator

        rank_processes._set_up = set_up_to_fail
    rank_processes.serve(rank, world_size, mode, port, conn, cancel)


COLLECTIVE_S = 5.0  # a setup collective's timeout in the test below (30 minutes or more)


def _serve_with_rank_1_hung_in_its_load(rank, world_size, mode, port, conn, cancel) -> None:
    """ranks.serve with collectives that time out after COLLECTIVE_S, and rank 1's load of
    the weights never returning (a read from a filesystem that stopped answering)."""
    rank_processes.COLLECTIVE_TIMEOUT_FLOOR = timedelta(seconds=COLLECTIVE_S)
    rank_processes.COLLECTIVE_TIMEOUT_MARGIN = timedelta(0)
    if rank == 1:
        generator_module.load_weights = lambda *args: time.sleep(HUNG_S * 100)
    rank_processes.serve(rank, world_size, mode, port, conn, cancel)


def test_a_rank_hung_in_setup_fails_setup_when_the_others_collective_times_out(
    tiny_weights, monkeypatch
):
    """No rank reports progress during setup, and a sound one can be silent for many minutes
    (a load from a slow disk, a compile of 140 s a graph). A rank hung in setup is found by
    the others instead: each waits for it in setup's collectives (the VAE tiling agreed after
    the load, the compiled warm-up), which fail after ranks.collective_timeout()."""
    monkeypatch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny_weights["1.0-t2v"]))
    monkeypatch.setenv("COGVIDEOX_LORA_TIMEOUT", "1")  # else 10 minutes, in the timeout too
    monkeypatch.setattr(rank_processes, "serve", _serve_with_rank_1_hung_in_its_load)
    setting_up = group.RankGroup("t2v", 2)  # as RankGroup.start, the weights a folder
    failed = []

    def await_ready() -> None:
        try:
            setting_up._await_ready()
        except RankGroupError as error:
            failed.append(str(error))

    waiting = threading.Thread(target=await_ready, daemon=True)
    waiting.start()
    waiting.join(20 * COLLECTIVE_S)
    setting_up.close(ask=False)
    assert len(failed) == 1, "setup still waits for the hung rank"
    # The hung rank first: the waiting rank's error alone read as rank 0's fault.
    said = (
        "ranks [1] never said ready (rank 1 was loading the model); rank 0 gave up waiting "
        "for it while agreeing on VAE tiling: RuntimeError: "
    )
    assert failed[0].startswith(said)
    assert "timed out" in failed[0].lower()


# gloo's error in a collective that waited past the collective timeout.
GLOO_TIMEOUT = (
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
    "waiting 1800000ms for recv operation to complete"
)
ABORT = "abort"  # in _setting_up's messages: the rank ends as NCCL's watchdog ends one


def _setting_up(said: dict[int, tuple], conn, rank: int) -> None:
    """A rank that sends said[rank] (its setup's messages: a SetupFailed after BOUND_S, as
    a timeout comes after the others' steps), then stays, as one hung in setup does."""
    for message in said.get(rank, ()):
        if isinstance(message, SetupFailed):
            time.sleep(BOUND_S)
        if message == ABORT:
            time.sleep(BOUND_S)
            faulthandler.disable()  # pytest's, inherited: its dump of the stack is noise here
            os.abort()
        conn.send(message)
    time.sleep(30)


def _setup_failure(said: dict[int, tuple], world_size: int) -> str:
    """What the group's setup fails with, its ranks saying `said` (_setting_up)."""
    answers = [(None, None)] * world_size
    rank_main = functools.partial(_setting_up, said)
    with (
        _group_answering(answers, rank_main=rank_main) as ranks,
        pytest.raises(RankGroupError) as failed,
    ):
        ranks._await_ready()
    return str(failed.value)


def test_of_four_ranks_setup_names_the_one_hung_not_those_waiting_with_the_rank_that_timed_out():
    """Ranks 0 to 2 wait for rank 3 in the same collective; rank 2's timeout comes first."""
    waiting = (SettingUp(0, SetupStep.JOINING), SettingUp(0, SetupStep.VAE_TILING))
    said = {
        0: waiting,
        1: waiting,
        2: (*waiting, SetupFailed(2, GLOO_TIMEOUT, timed_out=True)),
        3: (SettingUp(3, SetupStep.JOINING), SettingUp(3, SetupStep.LOADING)),
    }
    said = {rank: tuple(replace(m, rank=rank) for m in messages) for rank, messages in said.items()}
    assert _setup_failure(said, 4) == (
        "ranks [3] never said ready (rank 3 was loading the model); rank 2 gave up waiting "
        f"for it while agreeing on VAE tiling: {GLOO_TIMEOUT}"
    )


def test_a_rank_that_never_began_its_setup_is_named_when_the_rendezvous_times_out():
    said = {
        0: (
            SettingUp(0, SetupStep.JOINING),
            SetupFailed(0, "DistStoreError: wait timeout after 1800000ms", timed_out=True),
        )
    }
    assert _setup_failure(said, 2) == (
        "ranks [1] never said ready (rank 1 was starting); rank 0 gave up waiting for it "
        "while joining the other ranks: DistStoreError: wait timeout after 1800000ms"
    )


def test_a_rank_that_failed_in_setup_on_its_own_error_names_no_rank_still_loading():
    """Its error is the cause (a bad COGVIDEOX_UPSCALE_URL on rank 0), not the others: rank
    1, slower to load, is not hung."""
    said = {
        0: (
            SettingUp(0, SetupStep.LOADING),
            SettingUp(0, SetupStep.VAE_TILING),
            SetupFailed(0, "WeightsError: download timed out"),
        ),
        1: (SettingUp(1, SetupStep.LOADING),),
    }
    assert _setup_failure(said, 2) == "rank 0 failed in setup: WeightsError: download timed out"


def test_a_rank_ended_in_setup_names_the_ranks_it_was_waiting_for():
    """NCCL's watchdog ends a rank that waited past the timeout (no SetupFailed): the rank
    hung is named after the exit."""
    said = {
        0: (SettingUp(0, SetupStep.VAE_TILING), ABORT),
        1: (SettingUp(1, SetupStep.LOADING),),
    }
    assert _setup_failure(said, 2) == (
        "rank 0 was killed by SIGABRT during setup; "
        "ranks [1] never said ready (rank 1 was loading the model)"
    )


def test_a_rank_killed_in_setup_names_no_rank_waiting_ahead_of_it():
    """Rank 1 killed while loading (the OOM killer): rank 0, waiting for it, is not named."""
    said = {
        0: (SettingUp(0, SetupStep.VAE_TILING),),
        1: (SettingUp(1, SetupStep.LOADING), ABORT),
    }
    assert _setup_failure(said, 2) == "rank 1 was killed by SIGABRT during setup"


def _timed_out_store_read() -> BaseException:
    """The rendezvous store's own error for a key no rank wrote in time."""
    server = rendezvous_store()
    wait = timedelta(seconds=0.1)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=wait)
    with pytest.raises(dist.DistStoreError) as raised:
        client.get("never-written")
    return raised.value


def test_a_rank_knows_a_distributed_timeout_from_its_own_errors():
    assert rank_processes._gave_up_waiting(_timed_out_store_read())
    assert rank_processes._gave_up_waiting(
        RuntimeError(GLOO_TIMEOUT.removeprefix("RuntimeError: "))
    )
    assert not rank_processes._gave_up_waiting(WeightsError("download timed out"))
    assert not rank_processes._gave_up_waiting(RuntimeError("CUDA out of memory"))


def test_another_ranks_error_about_the_request_reaches_the_log_but_its_warnings_do_not(
    tiny_weights, monkeypatch, caplog
):
    """Two real rank processes: rank 1's GPU is lost in a request whose prompt is too long.
    Both lines come from the generator's logger. The warning every rank would repeat is
    logged once, by rank 0; rank 1's error, which rank 0 does not share, is logged marked
    with its rank: without it the server's log would not say which GPU failed."""
    monkeypatch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny_weights["1.0-t2v"]))
    monkeypatch.setattr(rank_processes, "serve", _serve_losing_rank_1s_gpu)
    monkeypatch.setattr(group, "FAILURE_GRACE_S", 1.0)  # rank 0 waits in a collective
    long_prompt = replace(REQUEST, prompt=" ".join(["a panda plays guitar"] * 100))
    with caplog.at_level(logging.INFO, logger="cogvideox_cog"):
        lost = group.RankGroup.start("t2v", 2)
        try:
            with pytest.raises(RankGroupError):
                lost.predict(long_prompt)
        finally:
            lost.close()
    lines = [record.getMessage() for record in caplog.records]
    assert [line for line in lines if "prompt is longer" in line and "rank 1" in line] == []
    assert len([line for line in lines if line.startswith("prompt is longer")]) == 1
    assert f"rank 1: the GPU failed for good in a prediction ({LOST}); " in caplog.text


def test_two_real_ranks_report_rank_1s_lost_gpu_while_rank_0_waits_in_a_collective(
    tiny_weights, monkeypatch
):
    """Rank 1's Triton kernel fails on a lost GPU before its first step's collective, where
    rank 0 waits for it: the prediction, the health check and the next prediction name
    rank 1's GPU."""
    monkeypatch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
    monkeypatch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny_weights["1.0-t2v"]))
    monkeypatch.setattr(rank_processes, "serve", _serve_losing_rank_1s_gpu)
    monkeypatch.setattr(group, "FAILURE_GRACE_S", 1.0)
    said = re.escape(f"rank 1's GPU failed for good ({LOST}); ranks [0] did not finish")
    lost = group.RankGroup.start("t2v", 2)
    try:
        with pytest.raises(RankGroupError, match=f"^{said}"):
            lost.predict(REQUEST)
        with pytest.raises(RankGroupError, match=f"^{said}"):
            lost.healthcheck()
        with pytest.raises(RankGroupError, match=f"^cannot predict: {said}"):
            lost.predict(REQUEST)
    finally:
        lost.close()


def test_a_cancel_while_rank_0_post_processes_alone_is_logged_after_the_last_step():
    """Rank 1 finished its steps; rank 0 stopped between upscaled frames: not "after step
    [0]", which reads as a cancel before any step."""
    outcomes = {0: Canceled(0, -1), 1: Done(1, None)}
    said = group._where_stopped(outcomes)
    assert said == "after the last step, while rank 0 post-processed the video"


def test_a_cancel_before_the_first_step_is_logged_as_such():
    """Every rank stopped at rank 0's LoRA download or prompt rewrite."""
    assert group._where_stopped({0: Canceled(0, -1), 1: Canceled(1, -1)}) == (
        "before the first step"
    )


def test_a_cancel_after_a_step_names_the_step_every_rank_stopped_after():
    assert group._where_stopped({0: Canceled(0, 3), 1: Canceled(1, 3)}) == "after step [4]"


def test_a_cancel_that_came_after_the_video_was_done_says_so():
    assert group._where_stopped({0: Done(0, None), 1: Done(1, None)}) == (
        "after the video was done"
    )


def test_a_cancel_after_a_rank_failed_is_logged_as_such():
    outcomes = {0: Canceled(0, 2), 1: Failed(1, RuntimeError("out of memory"))}
    assert group._where_stopped(outcomes) == "after rank 1 failed"


def test_a_bad_input_found_by_another_rank_is_the_users_error_as_it_is():
    error = InputError("prompt: too long")
    with pytest.raises(InputError) as raised:
        group._output({0: Canceled(0, 0), 1: Failed(1, error)})
    assert raised.value is error


def test_of_two_failed_ranks_rank_0s_error_is_reported():
    """Rank 0's own error (out of memory on its GPU), not the one it then caused on the rank
    waiting for it in a collective."""
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    outcomes = {1: Failed(1, RuntimeError("Connection closed by peer")), 0: Failed(0, oom)}
    with pytest.raises(RuntimeError) as raised:
        group._output(outcomes)
    assert raised.value is oom


def test_another_ranks_own_error_is_reported_naming_that_rank():
    error = group._error(Failed(1, ValueError("bad shape")))
    assert str(error) == "rank 1: ValueError: bad shape"


def test_rank_0s_error_is_reported_as_it_is():
    error = ValueError("bad shape")
    assert group._error(Failed(0, error)) is error


def test_rank_0_done_without_a_video_is_an_error_not_an_output():
    with pytest.raises(RuntimeError, match="instead of a video"):
        group._output({0: Done(0, None), 1: Done(1, None)})


@pytest.mark.parametrize(
    ("exitcode", "said"),
    [(0, "exited with code 0"), (-9, "was killed by SIGKILL"), (-35, "was killed by signal 35")],
)
def test_a_rank_that_ended_is_described_by_its_exit_code_or_signal(exitcode, said):
    assert group._exit_text(RankExited(1, exitcode)) == said


def _listening_on(port: int) -> list[str]:
    """The local addresses (as Linux's /proc/net tables write them) of the sockets that
    listen on `port`: "0100007F" is 127.0.0.1, all zeros is every interface."""
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.append(address)
    return addresses


def test_the_ranks_rendezvous_listens_on_loopback_only():
    """TCPStore's own server would take the port on every interface, where anyone on the
    network could write the ranks' keys."""
    store = rendezvous_store()
    assert _listening_on(store.port) == ["0100007F"]


def test_the_ranks_rendezvous_port_is_held_before_any_rank_starts():
    """No other program can take it between choosing it and the ranks meeting on it."""
    store = rendezvous_store()
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", store.port))


def test_the_ranks_rendezvous_port_is_released_with_the_store():
    store = rendezvous_store()
    port = store.port
    del store
    assert _listening_on(port) == []


READ_S = 6 * BOUND_S  # how long rank 1 reads each request's inputs below: past the bound
UPSCALE_FRAME_S = 0.2  # what rank 0 takes to upscale a frame below: 49 frames, seconds
UPSCALING = "upscaling a frame"


def _serve_reading_and_upscaling_slowly(rank, world_size, mode, port, conn, cancel) -> None:
    """ranks.serve, but rank 1 reads the inputs for READ_S (a long clip on a busy CPU), and
    rank 0 takes UPSCALE_FRAME_S a frame to upscale, saying so at the first one."""
    set_up = rank_processes._set_up

    def set_up_slowly(*args):
        generator = set_up(*args)
        if rank == 1:
            conditioned = generator._conditioned

            def read_slowly(request):
                time.sleep(READ_S)
                return conditioned(request)

            generator._conditioned = read_slowly
        else:
            own_cancel, said = generator.on_postprocess_progress, []

            def upscale_slowly():
                if not said:
                    said.append(True)
                    logging.getLogger("cogvideox_cog").info(UPSCALING)
                time.sleep(UPSCALE_FRAME_S)
                if own_cancel is not None:
                    own_cancel()

            generator.on_postprocess_progress = upscale_slowly
        return generator

    rank_processes._set_up = set_up_slowly
    rank_processes.serve(rank, world_size, mode, port, conn, cancel)


@pytest.fixture(scope="module")
def slow_ranks(tiny_weights, tmp_path_factory) -> Iterator[group.RankGroup]:
    """Two real rank processes on the tiny model, upscale enabled, slow as
    _serve_reading_and_upscaling_slowly says; the cancel's bound is BOUND_S."""
    folder = tmp_path_factory.mktemp("slow-ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
        patch.setenv("COGVIDEOX_WEIGHTS_URL", str(tiny_weights["1.0-t2v"]))
        patch.setenv(UPSCALE_ENV, "1")
        patch.setenv(UPSCALE_URL_ENV, str(save_tiny_realesrgan(folder / "realesrgan.pth")))
        patch.delenv(INTERPOLATE_ENV, raising=False)
        patch.setenv(WEIGHTS_DIR_ENV, str(folder / "weights"))
        patch.setattr(rank_processes, "serve", _serve_reading_and_upscaling_slowly)
        patch.setattr(group, "CANCEL_BOUND_S", BOUND_S)
        ranks = group.RankGroup.start("t2v", 2)
        try:
            yield ranks
        finally:
            ranks.close()


class _CancelOnLine(logging.Handler):
    """Cancels `thread` as Cog does, once, when the worker relays a line starting `text`."""

    def __init__(self, thread: threading.Thread, text: str):
        super().__init__()
        self.thread, self.text, self.fired = thread, text, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith(self.text):
            self.fired = True
            _cancel_in(self.thread)


def _canceled_at_line(ranks: group.RankGroup, request: Request, text: str) -> list:
    """What ranks.predict(request) raised, canceled as the worker relayed rank 0's `text`."""
    raised: list[BaseException] = []

    def predict() -> None:
        try:
            ranks.predict(request)
        except BaseException as error:
            raised.append(error)

    predicting = threading.Thread(target=predict, daemon=True)
    trigger = _CancelOnLine(predicting, text)
    relayed = logging.getLogger("cogvideox_cog")
    relayed.addHandler(trigger)
    try:
        predicting.start()
        predicting.join(60 + READ_S)
    finally:
        relayed.removeHandler(trigger)
    return raised


def test_a_cancel_while_rank_0_upscales_alone_stops_it_between_frames(slow_ranks, caplog):
    """Rank 1 is done after the last step; rank 0's upscale of a long video can take minutes,
    and stops at the cancel as on one GPU, rather than writing a video nobody wants."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")  # rank 0's lines are relayed there
    request = replace(REQUEST, num_frames=49, upscale="2x")
    raised = _canceled_at_line(slow_ranks, request, UPSCALING)
    assert len(raised) == 1 and isinstance(raised[0], CancelationException), raised
    stopped = "canceled: 2 ranks stopped, after the last step, while rank 0 post-processed"
    assert stopped in caplog.text
    assert "wrote " not in caplog.text and slow_ranks.healthcheck()


def test_a_cancel_while_a_rank_still_reads_the_inputs_waits_for_it_past_the_bound(
    slow_ranks, caplog
):
    """Rank 0 has read them and waits for rank 1 in the first step's collective: neither
    sends anything past the cancel's bound, but rank 1 said it began reading, so the group
    waits for it to reach the step, where both stop, rather than stopping as stuck."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")
    raised = _canceled_at_line(slow_ranks, REQUEST, "seed: ")
    assert len(raised) == 1 and isinstance(raised[0], CancelationException), raised
    assert "canceled: 2 ranks stopped, after step [1]" in caplog.text
    assert slow_ranks.healthcheck()
