"""Dataset preparation: PI-CAI, CheXpert, PatchCamelyon and generic medical images -> 8-bit PNG folders.

Each ``prepare_*`` function takes an options dataclass and an optional ``progress(done, total, msg)``
callback and returns a report (manifest rows, per-item failures). See ``meddiff prepare --help``.
"""
