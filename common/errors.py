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

    @classmethod
    def from_message(cls, message: str, item_id: str) -> ItemError:
        """The error of a per-item message '<item_id>: <reason>' (the form the pipeline reports
        failed rows in), so that a caller can rename it with `for_item`. A message that does not
        start with the id is the reason whole."""
        text = str(message)
        prefix = f"{item_id}: "
        return cls(item_id, text[len(prefix):] if text.startswith(prefix) else text)

    def __reduce__(self):  # rebuilt from its parts in another process (decode workers, Ray)
        return _rebuild, (type(self), self.item_id, self.reason)


def _rebuild(cls: type[ItemError], item_id: str, reason: str) -> ItemError:
    err = cls.__new__(cls)
    ItemError.__init__(err, item_id, reason)
    return err


def renamed(message: str, old_id: str, new_id: str) -> str:
    """A per-item error message '<old_id>: <reason>' as '<new_id>: <reason>' (the pipeline names
    a failed row by its input; a caller knows the row's own id). A message that does not start
    with `old_id` names no item and is returned as it is."""
    if not str(message).startswith(f"{old_id}: "):
        return message
    return str(ItemError.from_message(message, old_id).for_item(new_id))
