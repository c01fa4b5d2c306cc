from . import longmem_language_modeling  # noqa: F401  (registers the task)
