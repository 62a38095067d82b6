"""One exception type for everything a user can get wrong.

The CLI prints it as a single line; the library raises it so callers can do the same.
"""


class PortLLMError(Exception):
    """A problem with the user's input or environment, with what to do about it."""
