"""The base of every error a user fixes in the config, the model or the data.

Rule scripts report these as one message (no traceback: the message names
the run or key and the fix); anything else is unexpected and keeps its
traceback in the job's log.
"""


class UserError(ValueError):
    """Bad input: the message names where and how to fix it."""
