"""The plugin's user-facing errors: one line that names the problem and the fix.

Every error the package raises for bad input or configuration derives from
:class:`LongMemError`; the console scripts print it as ``error: ...`` (exit 2).
"""


class LongMemError(ValueError):
    """Bad input or configuration; the console scripts print it as ``error: ...``."""


class MemoryConfigError(LongMemError):
    """A memory configuration or memory file that cannot work (message names the fix)."""
