"""A device's side of the federated frugal wire (``splitkd/weights_codec.py``).

The device keeps the class student it last received (bit for bit what the cloud
believes it holds, named by its digest), names it when it fetches a round so the
cloud can send a delta, applies the delta and checks the digest the cloud sent.
Its update goes up as an int8 delta against that student, with what the previous
upload's rounding left out added in (error feedback). On ``float32`` none of this
happens: whole weights each way, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from splitkd import weights_codec as wc
from splitkd.messages import RoundTask, Update

log = logging.getLogger(__name__)
Weights = dict[str, np.ndarray]


class StaleBase(Exception):
    """The round's delta does not fit the weights held here: fetch them whole."""


@dataclass
class HeldStudent:
    codec: str
    encoder: wc.UploadEncoder
    weights: Weights | None = None
    digest: int = 0
    whole_fetches: int = field(default=0)  # deltas that did not fit (fetched again whole)

    @classmethod
    def for_member(cls, codec: str, seed: int) -> HeldStudent:
        return cls(codec, wc.UploadEncoder(seed))

    @property
    def deltas(self) -> bool:
        return self.codec == wc.INT8_DELTA

    def held_digest(self) -> int:
        """What to name in the fetch (0: ask for whole weights)."""
        return self.digest if self.deltas and self.weights is not None else 0

    def forget(self) -> None:
        self.weights, self.digest = None, 0
        self.whole_fetches += 1

    def take(self, task: RoundTask) -> Weights:
        """The round's student: the task's whole weights, or the held ones plus its delta."""
        if task.weights_base:
            if self.weights is None or task.weights_base != self.digest:
                raise StaleBase("the cloud sent a delta against weights this device does not hold")
            weights = wc.apply(self.weights, task.weights)
        else:
            weights = {k: np.asarray(v, np.float32) for k, v in task.weights.items()}
        if task.weights_digest and wc.digest(weights) != task.weights_digest:
            raise StaleBase("the weights differ from the cloud's (digest mismatch)")
        self.weights, self.digest = weights, task.weights_digest or wc.digest(weights)
        return weights

    def as_sent(self, update: Update) -> Update:
        """``update`` (the whole trained student) as this codec sends it."""
        if not self.deltas or self.weights is None:
            return update
        packed = self.encoder.encode(update.weights, self.weights)
        return Update(
            update.member_id,
            update.round,
            {},
            update.num_samples,
            update.heldout_accuracy,
            update.steps,
            weights_base=self.digest,
            packed=packed,
        )
