"""Learning-rate schedules in A1111's syntax: ``"0.05:10, 0.005:200, 0.001"``.

Each ``rate:step`` pair holds until ``step`` optimizer steps are done; a bare rate (or
``rate:-1``) holds until the end. As in A1111, training ends when the last explicit step is
reached, even if more steps were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from medical_diffusion.errors import MedDiffError

_HELP = 'write a number, or pairs like "0.005:100, 1e-3:1000, 1e-5" (rate until step, last rate to the end)'


@dataclass(frozen=True)
class LearnRateSchedule:
    """``(rate, end_step)`` pieces; ``end_step`` None means "until the last step"."""

    pieces: tuple[tuple[float, int | None], ...]

    @classmethod
    def parse(cls, text: str | float) -> "LearnRateSchedule":
        if isinstance(text, (int, float)):
            text = str(text)
        pieces: list[tuple[float, int | None]] = []
        try:
            for part in str(text).split(","):
                if not part.strip():
                    continue
                bits = part.split(":")
                if len(bits) > 2:
                    raise ValueError(part)
                rate = float(bits[0])
                end = int(bits[1]) if len(bits) == 2 else None
                if end == -1:
                    end = None
                if not rate > 0 or (end is not None and end < 1):
                    raise ValueError(part)
                if pieces and pieces[-1][1] is None:
                    break  # A1111 ignores anything after an open-ended rate
                if end is not None and pieces and pieces[-1][1] is not None and end <= pieces[-1][1]:
                    raise ValueError(part)
                pieces.append((rate, end))
        except ValueError:
            raise MedDiffError(f"invalid learning rate schedule {text!r}: {_HELP}") from None
        if not pieces:
            raise MedDiffError(f"invalid learning rate schedule {text!r}: {_HELP}")
        return cls(tuple(pieces))

    def total_steps(self, max_steps: int) -> int:
        """Steps actually run when ``max_steps`` are asked for."""
        last_end = self.pieces[-1][1]
        return max_steps if last_end is None else min(max_steps, last_end)

    def rate_at(self, steps_done: int) -> float:
        """Learning rate for the optimizer step taken after ``steps_done`` steps."""
        for rate, end in self.pieces:
            if end is None or steps_done < end:
                return rate
        return self.pieces[-1][0]
