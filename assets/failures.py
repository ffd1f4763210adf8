"""One way to fail an asset: a one-line description that names what is wrong and what to do."""

import dagster as dg


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failure(exc_or_message: BaseException | str) -> dg.Failure:
    """A Dagster failure with one line of description, not retried (bad input stays bad)."""
    message = exc_or_message if isinstance(exc_or_message, str) else one_line(exc_or_message)
    return dg.Failure(description=message, allow_retries=False)
