"""One family for the errors a user can fix.

`cli.py` catches `UserError` (and only it) and ends the command with one line, "Error: <message>",
and exit status 1; anything else is a bug and keeps its traceback. Stage-specific errors
(`ModelError`, `DataError`, `ExportError`, ...) subclass `UserError`.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: a file, a folder, an option, a dataset, a request."""


class ItemError(UserError):
    """One input item (an image, a row, a request input) could not be used.

    It carries the item's id, so callers that know a better id make a new error with
    `err.for_item(new_id)` instead of rewriting the message text.
    """

    def __init__(self, item_id: str, reason: str):
        self.item_id = str(item_id)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.item_id}: {self.reason}")

    def for_item(self, item_id: str) -> ItemError:
        """The same error, named by another id (a path instead of an index, say)."""
        err = type(self).__new__(type(self))
        ItemError.__init__(err, item_id, self.reason)
        return err
