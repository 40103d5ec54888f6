"""The one way between the engine's callers and its model thread, without a
model: commands in, in order; replies out, to an asyncio loop or a waiting
thread; nothing accepted once the engine stops, and nothing left hanging."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tunewire.services.common.errors import NotFound, Unavailable
from tunewire.services.inference.boundary import Inbox, LoopReply, WaitingReply, run_command


def model_thread(inbox: Inbox, ran: list) -> threading.Thread:
    def loop() -> None:
        while (commands := inbox.take(lambda: False)) is not None:
            for command, reply in commands:
                run_command(command, reply)
                ran.append(threading.current_thread().name)

    thread = threading.Thread(target=loop, name="model", daemon=True)
    thread.start()
    return thread


def test_commands_run_in_order_on_the_model_thread_and_their_errors_reach_the_caller():
    inbox, ran, order = Inbox(), [], []
    thread = model_thread(inbox, ran)
    replies = [WaitingReply() for _ in range(5)]
    for i, reply in enumerate(replies):
        inbox.post(lambda r, i=i: (order.append(i), r.finish(i * i)), reply)
    assert [r.result(5) for r in replies] == [0, 1, 4, 9, 16] and order == [0, 1, 2, 3, 4]
    failing = WaitingReply()

    def fail(_reply):
        raise NotFound("adapter 'x' is not loaded")

    inbox.post(lambda _: None, None)  # fire and forget: nothing to answer
    inbox.post(fail, failing)
    with pytest.raises(NotFound):
        failing.result(5)
    inbox.close()
    thread.join(5)
    assert not thread.is_alive() and set(ran) == {"model"} and len(ran) == 7


def test_a_closed_inbox_answers_shutting_down_and_hands_back_what_never_ran():
    inbox = Inbox()
    pending = WaitingReply()
    inbox.post(lambda r: r.finish("ran"), pending)
    assert [reply for _, reply in inbox.close()] == [pending]  # the caller of close answers them
    assert inbox.take(lambda: True) is None
    late = WaitingReply()
    inbox.post(lambda r: r.finish("ran"), late)
    with pytest.raises(Unavailable, match="shutting down"):
        late.result(0)


def test_a_loop_reply_delivers_items_then_the_outcome_on_its_own_event_loop():
    async def scenario():
        reply = LoopReply()
        loop_thread = threading.current_thread()

        def model_side():
            for delta in ("a", "b", "c"):
                reply.send(delta)
            reply.finish("done")

        threading.Thread(target=model_side).start()
        seen = []
        async for item in reply.items():
            seen.append((item, threading.current_thread() is loop_thread))
        failed = LoopReply()
        threading.Thread(target=lambda: failed.finish(ValueError("bad row"))).start()
        with pytest.raises(ValueError, match="bad row"):
            await failed.result()
        return seen

    assert asyncio.run(scenario()) == [("a", True), ("b", True), ("c", True), ("done", True)]


def test_a_reply_whose_loop_has_closed_is_dropped_quietly():
    async def make():
        return LoopReply()

    reply = asyncio.run(make())  # the loop is closed once run() returns
    reply.send("late delta")
    reply.finish("late result")  # nobody listens: no error on the model thread
