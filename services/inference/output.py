"""The output side of generation: token ids in, text out, a little at a time.

A request's text goes to its caller as it is decoded. Decoding each token
alone breaks characters that span tokens and the leading-space rules of
sentencepiece tokenizers; decoding the whole answer on every token costs time
in its length. `TextStream` decodes a short window, as
text-generation-inference does, and looks for stop strings only in the text's
tail. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass
class TextStream:
    """A request's text as its tokens arrive. Each token decodes only the
    last few (the text of ids[prefix:] less that of ids[prefix:read], so a
    tokenizer's leading-space rules cancel out) and looks for stop strings
    only where the new text could complete one: a token costs the same at
    the end of a long answer as at its start. `on_text` gets each delta,
    less what could still turn out to be the start of a stop string."""

    tokenizer: object
    stop: tuple[str, ...]
    on_text: Callable[[str], None]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, whole characters only
    prefix: int = 0  # token offsets of the decoding window
    read: int = 0
    sent: int = 0
    stopped_at: int | None = None  # character index of a stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.stopped_at is not None:
            return
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return  # no new whole character yet
        searched_from = max(0, len(self.text) - max((len(s) - 1 for s in self.stop), default=0))
        self.text += window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            index = self.text.find(s, searched_from)
            if index != -1 and (self.stopped_at is None or index < self.stopped_at):
                self.stopped_at = index
        if self.stopped_at is not None:
            self.text = self.text[: self.stopped_at]
            safe = len(self.text)
        else:
            # Hold back what could still become a stop string.
            safe = len(self.text) - max((len(s) - 1 for s in self.stop), default=0)
        if safe > self.sent:
            self.on_text(self.text[self.sent : safe])
            self.sent = safe

    def finish(self) -> str:
        if self.stopped_at is None:  # tokens that never made a whole character
            self.text += self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
        if len(self.text) > self.sent:
            self.on_text(self.text[self.sent :])
            self.sent = len(self.text)
        return self.text
