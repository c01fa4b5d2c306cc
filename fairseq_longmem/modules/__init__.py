"""Memory bank, joint attention, side network: plain torch, no fairseq registration."""
