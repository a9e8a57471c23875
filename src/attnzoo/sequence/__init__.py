"""Sequence attention: generic soft addressing, multi-head, seq2seq and transformer variants."""
