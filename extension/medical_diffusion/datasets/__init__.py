"""Dataset preparation: PI-CAI, CheXpert, PatchCamelyon and generic medical images -> 8-bit PNG folders.

Each ``prepare_*`` function takes an options dataclass and an optional ``progress(done, total, message)``
callback and returns a :class:`~medical_diffusion.datasets.batch.BatchResult` (manifest rows, per-item
failures, counts of made/skipped items)::

    from medical_diffusion.datasets.picai import PicaiOptions, prepare_picai
    result = prepare_picai(PicaiOptions(images="picai/images", labels="picai_labels", out="prep",
                                        n_per_class=100, splits=("train", "val", "test"), workers=2))

Output folder: ``embedding/<class>/`` (embedding training; the train split when splits are made),
``classifier/<split>/<class>/``, ``manifest.csv``, ``failures.csv``, ``contact_sheet.png`` and a hidden
journal that lets a re-run skip finished items. Sources are only read.
"""
