from . import alibi_lm, longmem  # noqa: F401  (registers the models)
