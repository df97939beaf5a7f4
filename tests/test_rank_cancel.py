"""Cog's cancel landing at the worst moments of a multi-GPU prediction (parallel/group.py),
with two real rank processes on gloo serving the tiny text-to-video model.

Cog 0.23.1 cancels a sync predictor by raising CancelationException in the thread running
predict (PyThreadState_SetAsyncExc), at whatever bytecode that thread is at. The tests do the
same to a thread running RankGroup.predict, timed by something the worker really does at
that moment: serializing the request for a rank, or relaying one of rank 0's log lines.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from cog import CancelationException

from cogvideox_cog.devtools.tiny import save_tiny_weights
from cogvideox_cog.generator import Request
from cogvideox_cog.parallel.group import CANCEL_BOUND_S, RankGroup
from cogvideox_cog.parallel.ranks import PROGRESS_EVERY_S

REQUEST = Request("a panda plays guitar", "", 9, 2, 6.0, None, None, seed=5)
ANSWER_S = 60.0  # a two-step tiny render, with room for a loaded machine
# 49 frames: rank 0's decode lasts seconds after rank 1 answered (9: a tenth of a second).
DECODED_ALONE = replace(REQUEST, num_frames=49)
HOLD_S = 10.0  # the longest rank 1's copy of the request is held back (see _CancelOnCopy)


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Iterator[RankGroup]:
    weights = save_tiny_weights(tmp_path_factory.mktemp("tiny") / "1.0-t2v", "1.0", "t2v")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COGVIDEOX_MODEL", "cogvideox-5b")
        patch.setenv("COGVIDEOX_WEIGHTS_URL", str(weights))  # a folder: used in place
        ranks = RankGroup.start("t2v", 2)
    yield ranks
    ranks.close()


@pytest.fixture(scope="module")
def reference(group) -> np.ndarray:
    """REQUEST's frames, rendered by the group before any cancel."""
    return _frames(group.predict(REQUEST))


class _Prediction(threading.Thread):
    """group.predict(request) on a thread of its own, as Cog runs a prediction."""

    def __init__(self, group: RankGroup, request: Request):
        super().__init__(name="prediction", daemon=True)
        self.group, self.request = group, request
        self.outcome: Path | BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.group.predict(self.request)
        except BaseException as error:
            self.outcome = error

    def cancel(self) -> None:
        """As coglet cancels it: CancelationException raised in this thread, at its next
        bytecode."""
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(self.ident), ctypes.py_object(CancelationException)
        )

    def result(self, timeout: float) -> Path | BaseException:
        self.join(timeout)
        assert not self.is_alive(), f"the prediction still runs after {timeout:.0f} s"
        return self.outcome


class _CancelOnCopy(str):
    """A prompt that cancels its prediction when it is pickled for the second rank: rank 0
    already has the request, rank 1 not yet. Rank 1's copy is held back until the worker has
    taken the cancel (it sets the ranks' cancel flag), or for HOLD_S; the ranks get a plain
    str."""

    prediction: _Prediction
    copies = 0
    held_until_taken = False

    def __reduce__(self):
        self.copies += 1
        if self.copies == 2:
            self.prediction.cancel()
            self.held_until_taken = self.prediction.group._cancel.wait(HOLD_S)
        return str, (str(self),)


class _CancelOnLine(logging.Handler):
    """Cancels the prediction, once, while the worker relays rank 0's line starting with
    `text` (a line relayed when the cancel lands may be relayed again)."""

    def __init__(self, prediction: _Prediction, text: str):
        super().__init__()
        self.prediction, self.text, self.fired = prediction, text, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith(self.text):
            self.fired = True
            self.prediction.cancel()


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_cancel_between_two_ranks_copies_of_a_request_leaves_no_rank_behind(group, reference):
    """Had rank 0 alone started the canceled request, it would wait in its first collective
    for rank 1, which would join it with the next request: that one's video would come out
    of two requests mixed, and every later one a request late."""
    prompt = _CancelOnCopy("a panda plays drums")
    canceled = _Prediction(group, replace(REQUEST, prompt=prompt, seed=6))
    prompt.prediction = canceled
    canceled.start()
    assert isinstance(canceled.result(ANSWER_S), CancelationException)
    following = _Prediction(group, REQUEST)
    following.start()
    assert np.array_equal(_frames(following.result(ANSWER_S)), reference)
    assert prompt.held_until_taken  # the cancel did land while rank 1 lacked the request


def test_a_cancel_after_rank_1_answered_and_before_rank_0_did_counts_both(group, caplog):
    """Rank 1's part ends with the last step; rank 0 then decodes and encodes alone (for
    seconds here, longer with upscale), and the worker reads rank 1's Done meanwhile. The
    cancel lands as it relays rank 0's last line. Rank 1 will not answer again: a wait that
    forgot its answer would take it for stuck after CANCEL_BOUND_S and stop the group."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")  # rank 0's lines are relayed there
    prediction = _Prediction(group, DECODED_ALONE)
    trigger = _CancelOnLine(prediction, "wrote ")
    logging.getLogger("cogvideox_cog").addHandler(trigger)
    try:
        prediction.start()
        outcome = prediction.result(CANCEL_BOUND_S + ANSWER_S)
    finally:
        logging.getLogger("cogvideox_cog").removeHandler(trigger)
    assert isinstance(outcome, CancelationException), outcome
    assert group.healthcheck()


class _SecondCancelOnFlag:
    """The ranks' cancel flag as the worker holds it. When the worker sets it for the first
    cancel, a second cancel is raised in the same thread: it lands before the wait for the
    ranks has begun, where no handler catches it (a client sending cancel twice)."""

    def __init__(self, flag, prediction: _Prediction):
        self.flag, self.prediction, self.fired = flag, prediction, False

    def set(self) -> None:
        self.flag.set()
        if not self.fired:
            self.fired = True
            self.prediction.cancel()

    def __getattr__(self, name: str):
        return getattr(self.flag, name)


def _canceled_twice_at_step_1(group, request, second_cancel, monkeypatch):
    """The outcome of `request`, canceled as rank 0 logs its first step, and again where
    `second_cancel` (a wrapper of the group's cancel flag) lands it."""
    prediction = _Prediction(group, request)
    monkeypatch.setattr(group, "_cancel", second_cancel(group._cancel, prediction))
    trigger = _CancelOnLine(prediction, "step 1/")
    logging.getLogger("cogvideox_cog").addHandler(trigger)
    try:
        prediction.start()
        return prediction.result(ANSWER_S)
    finally:
        logging.getLogger("cogvideox_cog").removeHandler(trigger)


def test_a_second_cancel_before_the_wait_leaves_the_next_prediction_its_own_video(
    group, reference, monkeypatch, caplog
):
    """The second cancel takes the prediction out before the worker waited for the ranks:
    they may still be rendering the canceled request. The next prediction must stop that
    first, or it would pair with it and return its video."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")  # rank 0's lines are relayed there
    request = replace(REQUEST, prompt="a panda plays drums", seed=7)
    outcome = _canceled_twice_at_step_1(group, request, _SecondCancelOnFlag, monkeypatch)
    assert isinstance(outcome, CancelationException), outcome
    assert group._cancel.fired
    following = _Prediction(group, REQUEST)
    following.start()
    assert np.array_equal(_frames(following.result(CANCEL_BOUND_S + ANSWER_S)), reference)
    assert group.healthcheck()


class _SecondCancelBeforeFlag(_SecondCancelOnFlag):
    """As _SecondCancelOnFlag, but the second cancel lands before the flag is set: the
    ranks go on rendering the canceled request, told nothing."""

    def set(self) -> None:
        if not self.fired:
            self.fired = True
            self.prediction.cancel()
            for _ in range(10**8):  # the cancel lands at the loop's first turn
                pass
        self.flag.set()


LONG_STEPS = 500  # seconds of steps on the tiny model: the ranks are still at them


def test_ranks_left_rendering_a_canceled_request_are_stopped_by_the_next_prediction(
    group, reference, monkeypatch, caplog
):
    """A second cancel before the first set the ranks' flag leaves them rendering all of
    a long request: the next prediction stops them after their step under way instead of
    waiting for that video (and its decode and encode) first."""
    caplog.set_level(logging.INFO, logger="cogvideox_cog")  # rank 0's lines are relayed there
    long = replace(REQUEST, prompt="a panda plays drums", seed=7, num_inference_steps=LONG_STEPS)
    outcome = _canceled_twice_at_step_1(group, long, _SecondCancelBeforeFlag, monkeypatch)
    assert isinstance(outcome, CancelationException), outcome
    assert group._cancel.fired and not group._cancel.is_set()
    caplog.clear()
    group._finish_unsettled()
    assert f"step {LONG_STEPS}/{LONG_STEPS}" not in caplog.text
    assert "wrote " not in caplog.text
    assert np.array_equal(_frames(group.predict(REQUEST)), reference)


def test_rank_0_reports_progress_to_the_worker_during_a_prediction(group, reference):
    """Its block hooks, put in by the rank process's setup, send Progress while the steps
    run (the worker's sign that the ranks are alive after a cancel); the video is the same.
    They send one a second at most: the reference's, just before, would hold this one back."""
    time.sleep(PROGRESS_EVERY_S)
    video = group.predict(REQUEST)
    assert group._progressed is not None
    assert np.array_equal(_frames(video), reference)
