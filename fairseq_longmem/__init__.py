"""fairseq-longmem: LongMem (Wang et al., NeurIPS 2023) as a fairseq plugin.

Importing this package registers with fairseq:

* task ``longmem_language_modeling`` (documents as streams),
* model ``longmem`` (arches ``longmem_tiny``, ``longmem_small``, ``longmem_gpt2_medium``),
* model ``memtrm`` (the MemTRM baseline: ``memtrm_tiny``, ``memtrm_small``, ``memtrm_gpt2_medium``),
* model ``alibi_lm`` (the default backbone: ``alibi_lm_tiny`` .. ``alibi_lm_gpt2_medium``),
* criterion ``longmem_cross_entropy``.

Use it with ``--user-dir path/to/fairseq_longmem`` or, once installed, through
the ``longmem-train`` / ``longmem-eval-lm`` / ``longmem-preprocess`` commands.
"""

__version__ = "0.1.0"

import logging

# faiss's loader logs which CPU instruction sets it tried (DEBUG/INFO lines such
# as "Could not load library with AVX512 support"); that is not for a user's terminal
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from . import criterions, models, tasks  # noqa: F401,E402  (registration)
