from . import alibi_lm, longmem  # noqa: F401  (registers the models)
from . import memtrm  # noqa: F401,E402  (registers the MemTRM baseline)
