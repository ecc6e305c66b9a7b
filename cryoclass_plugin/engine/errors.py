"""The one exception type the engine raises for bad input or bad options.

Its message is a single line naming the file, the field and the fix; the command-line
front end prints it as ``cryoclass: error: <message>`` and exits with status 2, never a
traceback.
"""


class CryoClassError(Exception):
    """Bad input or options; ``str(err)`` is one line meant for the user."""


class NotImplementedOption(CryoClassError):
    """An option that is accepted for RELION compatibility but not implemented yet."""


class RunInterrupted(CryoClassError):
    """A run ended by SIGINT / SIGTERM; the message names the iteration to continue from."""
    exit_code = 130
