"""How the worker waits for its rank processes' answers (parallel/group.py), with real
processes and pipes standing in for ranks that answer late."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from cogvideox_cog.errors import RankGroupError
from cogvideox_cog.parallel import group
from cogvideox_cog.parallel.protocol import Canceled, Done

BOUND_S = 0.5


def _answer_after(conn, delay: float, answer) -> None:
    time.sleep(delay)
    conn.send(answer)
    time.sleep(30)  # stays alive, as a rank does between requests


def _group_answering(answers: list[tuple[float, object]]) -> group.RankGroup:
    """A RankGroup whose rank r sends answers[r][1] after answers[r][0] seconds."""
    context = multiprocessing.get_context("fork")
    ranks = group.RankGroup.__new__(group.RankGroup)
    ranks.world_size, ranks.failure, ranks._closing = len(answers), None, False
    ranks._cancel = context.Event()
    ranks._processes, ranks._conns = [], []
    for delay, answer in answers:
        ours, theirs = context.Pipe()
        process = context.Process(target=_answer_after, args=(theirs, delay, answer))
        process.start()
        theirs.close()
        ranks._processes.append(process)
        ranks._conns.append(ours)
    ranks._inbox = group._Inbox(ranks._processes, ranks._conns, ranks._rank_ended)
    ranks._outbox = group._Outbox()
    return ranks


def test_rank_0_working_alone_after_the_others_stopped_is_waited_for_past_the_bound():
    """Its decode and encode (a 4x upscaled video) can outlast the cancel bound; the others
    are out of every collective, so it is slow, not stuck."""
    ranks = _group_answering([(3 * BOUND_S, Done(0, None)), (0.0, Canceled(1, 2))])
    outcomes = {}
    try:
        ranks._outcomes(outcomes, bound=BOUND_S)
    finally:
        ranks.close(ask=False)
    assert set(outcomes) == {0, 1} and ranks.failure is None


def test_another_rank_late_past_the_bound_stops_the_group_as_stuck():
    ranks = _group_answering([(0.0, Canceled(0, 2)), (30.0, Canceled(1, 2))])
    try:
        with pytest.raises(RankGroupError, match=r"ranks \[1\] did not finish within 0 s"):
            ranks._outcomes({}, bound=BOUND_S)
    finally:
        ranks.close(ask=False)
    assert "stuck" in ranks.failure
