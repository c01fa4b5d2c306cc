"""The plugin's user-facing error: one line that names the problem and the fix."""


class LongMemError(ValueError):
    """Bad input or configuration; the console scripts print it as ``error: ...``."""
