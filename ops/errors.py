"""The one exception the toolkit raises for problems a user can act on."""


class OpsError(Exception):
    """A failure with a message for the user and, where there is one, a hint.

    The tasks print ``message`` and ``hint`` and exit non-zero; nothing above
    them needs a traceback to understand what went wrong.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message
