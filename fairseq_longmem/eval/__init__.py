"""Evaluations: bucketed perplexity, chapter-break, in-context learning, report."""
