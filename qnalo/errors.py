"""Exception types. Every error qnalo raises on bad input is one of these, with a one-line message
that says what was wrong and what to do."""


class QnaloError(Exception):
    """Base class of qnalo's own errors."""


class InputError(QnaloError, ValueError):
    """An input array (or argument) the model cannot take: wrong rank, channels, dtype or size."""


class CheckpointError(QnaloError):
    """A weights file that cannot be read or does not match the model: truncated, foreign,
    missing/unexpected/mis-shaped keys."""


class VariantMismatchError(CheckpointError):
    """A weights file that holds another model than the variant it was asked to be. `what` says what it holds,
    the message adds how to load it anyway."""

    def __init__(self, what):
        super().__init__(f"{what}; load the file as it is with qnalo.load(path)")
        self.what = what


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something outside the allow-list of a state dict."""


def name_list(names, limit=10):
    """'a, b, c' naming at most `limit` items, then 'and N more'."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def key_mismatches(shapes, expected, limit=10):
    """Compare name -> shape maps: ["missing keys: ...", "unexpected keys: ...", "wrong shapes: ..."], each
    present only when non-empty and naming at most `limit` keys. Empty when `shapes` fits `expected`."""
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected]
    wrong = [f"{key} {shapes[key]} (expected {expected[key]})"
             for key in shapes if key in expected and shapes[key] != expected[key]]
    return [f"{what}: {name_list(items, limit)}" for what, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]


def missing_signature(keys, signature, what, found=None):
    """None when every key of `signature` is among `keys`; else "<what>: no <missing>", followed by
    "(<found> found: <a few keys>)" when `found` names them. Tells a checkpoint of one family from another."""
    missing = [key for key in signature if key not in keys]
    if not missing:
        return None
    reason = f"{what}: no {name_list(missing)}"
    return reason if found is None else f"{reason} ({found} found: {name_list(sorted(keys), limit=5) or 'none'})"
