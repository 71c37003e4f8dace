"""A terminal progress bar fed by ``progress(done, total)`` callbacks (tqdm)."""

from __future__ import annotations


class StepBar:
    """A tqdm bar that follows ``bar(done, total)`` calls; ``leave=False`` clears it when closed."""

    def __init__(self, desc: str, unit: str = "step", leave: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
