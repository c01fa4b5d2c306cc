"""Corpus preprocessing for fairseq-longmem.

Turns raw documents (a folder of text files or a Pile-style ``.jsonl``) into a
binarized fairseq dataset that keeps document boundaries: every document is a
run of non-empty lines and documents are separated by one empty line, which
fairseq binarizes as a length-1 item (just ``</s>``).

Installed as ``fairseq_longmem.preprocess`` (the only way to import it; run its
CLI as ``longmem-preprocess`` or ``python -m fairseq_longmem.preprocess.prepare_corpus``).

Modules:

* :mod:`preprocess.documents` -- reading documents (:func:`iter_documents`).
* :mod:`preprocess.stdlib_corpus` -- the quickstart corpus (Python stdlib sources).
* :mod:`preprocess.prepare_corpus` -- the end-to-end pipeline and its CLI.
"""
