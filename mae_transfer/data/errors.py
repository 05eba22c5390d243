"""The one exception type of the data package."""

from __future__ import annotations

import re

# How torch.utils.data re-raises an exception that happened in a DataLoader worker:
# ``ExceptionWrapper.reraise`` calls ``DataError("Caught DataError in DataLoader worker process 0.\n
# Original Traceback (most recent call last): ... DataError: <message>")``.
_WORKER_PREFIX = re.compile(r"^Caught DataError in DataLoader worker process \d+\.\nOriginal Traceback")


class DataError(Exception):
    """A dataset that cannot be used as given.

    The message names the file or folder at fault and says what to do about it; the command-line
    interface prints it without a traceback.
    """

    def __init__(self, message: str = ""):
        self.worker_traceback: str | None = None
        text = str(message)
        if _WORKER_PREFIX.match(text):
            # A user should see the message, not a worker's traceback: keep the traceback for
            # debugging and show the original message, which follows the last "DataError: ".
            self.worker_traceback = text
            cut = text.rfind("DataError: ")
            if cut >= 0:
                text = text[cut + len("DataError: ") :].strip()
        super().__init__(text)
