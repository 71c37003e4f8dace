"""``meddiff demo``: the whole workflow headless on an embedded default (tiny model, phantom data)."""
