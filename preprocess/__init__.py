"""Corpus preprocessing for fairseq-longmem.

Turns raw documents (a folder of text files or a Pile-style ``.jsonl``) into a
binarized fairseq dataset that keeps document boundaries: every document is a
run of non-empty lines and documents are separated by one empty line, which
fairseq binarizes as a length-1 item (just ``</s>``).

Modules:

* :mod:`preprocess.documents` -- reading documents (:func:`iter_documents`).
* :mod:`preprocess.stdlib_corpus` -- the quickstart corpus (Python stdlib sources).
* :mod:`preprocess.prepare_corpus` -- the end-to-end pipeline and its CLI.
"""
