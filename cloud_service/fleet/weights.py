"""The frugal wire of federated cohorts on the cloud: weights as int8 deltas.

A member's weights codec is settled at its join, as a split member's wire is
(``fleet/wire.py``): what the device asks (``splitkd-edge train --weights-codec``),
else the cohort's ``weights_codec`` (``--cohort-config``), else ``serve
--weights-codec``. An unknown codec is INVALID_ARGUMENT, one outside the cohort's
``weights_codecs`` FAILED_PRECONDITION.

On ``int8-delta`` the cloud keeps, per member, the weights the device holds (the
dequantised result of what it sent, named by their digest): a round's student
goes down as a delta against them when the device names them in its fetch, whole
otherwise (its first round, after a restart or a take-over, an unknown digest), and
the device's update comes back as a delta against them. Nothing here is saved: a
cloud that lost them sends whole weights and answers a delta update
FAILED_PRECONDITION ``weights-base-unknown``, on which the device sends its whole
student. Memory: one float32 student per member on this codec.
"""

from __future__ import annotations

import contextvars
import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cloud_service.fleet.cohort import Member
from splitkd import weights_codec as wc
from splitkd.errors import FailedPrecondition, InvalidArgument
from splitkd.messages import CohortConfig
from splitkd.models.normalize import check_std

Weights = dict[str, np.ndarray]

# The weights codec the JoinCohort being served asks for (set by fleet/wire_servicer.py).
weights_ask: contextvars.ContextVar[str] = contextvars.ContextVar("splitkd_weights_ask", default="")


def negotiate_weights(config: CohortConfig, ask: str, student: Mapping[str, np.ndarray]) -> str:
    """The member's weights codec, or a clear refusal (checked at join)."""
    if ask:
        wc.check_name(ask)
        if config.weights_codecs and ask not in config.weights_codecs:
            raise FailedPrecondition(
                f"this cohort does not allow the weights codec {ask!r}: ask one of "
                f"{list(config.weights_codecs)}, or none for its default {config.weights_codec!r}"
            )
    chosen = ask or config.weights_codec
    # A student with a tensor that is not float32 (none of the zoo's) travels whole.
    return chosen if wc.deltas_fit(student) else wc.FLOAT32


@dataclass
class _Held:
    weights: Weights  # what the member holds, bit for bit
    digest: int
    last: tuple[int, int, wc.Download] | None = None  # (round, asked base, answer)


class WeightMirrors:
    """Per member on ``int8-delta``: the weights the device holds, and its downloads."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._quantisers: dict[str, wc.DeltaQuantiser] = {}

    def _quantiser(self, member: Member) -> wc.DeltaQuantiser:
        # Seeded by the device (not the random member id) so that a run repeats.
        q = self._quantisers.get(member.member_id)
        if q is None:
            q = wc.DeltaQuantiser(self.seed * (1 << 32) + zlib.crc32(member.device_id.encode()))
            self._quantisers[member.member_id] = q
        return q

    def download(
        self, member: Member, number: int, target: Mapping[str, np.ndarray], held: int
    ) -> wc.Download:
        """Round ``number``'s student for a member that holds the weights of digest ``held``."""
        with self._lock:
            mine = self._held.get(member.member_id)
            if mine is not None and mine.last is not None and mine.last[:2] == (number, held):
                return mine.last[2]  # a repeated fetch (its answer was lost): the same answer
            if mine is None or not held or mine.digest != held:
                new = {k: np.array(v, np.float32) for k, v in target.items()}
                answer = wc.Download(new, {}, 0, wc.digest(new))
            else:
                q = self._quantiser(member)
                packed = {
                    k: q.encode(np.asarray(v, np.float32) - mine.weights[k])
                    for k, v in target.items()
                }
                new = wc.apply(mine.weights, {k: wc.decode(v) for k, v in packed.items()})
                answer = wc.Download({}, packed, held, wc.digest(new))
            self._held[member.member_id] = _Held(new, answer.digest, (number, held, answer))
            return answer

    def reconstruct(self, member: Member, base: int, deltas: Mapping[str, np.ndarray]) -> Weights:
        """A delta update applied to the weights it names; refused before any aggregate."""
        with self._lock:
            mine = self._held.get(member.member_id)
        if mine is None or mine.digest != base:
            raise FailedPrecondition(
                f"{wc.BASE_UNKNOWN}: the cloud does not hold the weights this update is a "
                "delta against (it restarted, or another replica took the cohort over); "
                "send the whole student"
            )
        weights = wc.apply(mine.weights, deltas)
        for name, value in weights.items():
            if not np.isfinite(value).all():
                raise InvalidArgument(f"update weight deltas[{name!r}]: the result is not finite")
            check_std(name, value)  # input statistics must not divide by zero
        return weights

    def drop(self, member_ids: Iterable[str]) -> None:
        with self._lock:
            for member_id in member_ids:
                self._held.pop(member_id, None)
                self._quantisers.pop(member_id, None)

    def held(self, member_id: str) -> Weights | None:
        """What the cloud believes the member holds (tests compare it bit for bit)."""
        with self._lock:
            mine = self._held.get(member_id)
        return None if mine is None else mine.weights
