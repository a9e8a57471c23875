"""Networks built from attnzoo mechanisms: seq2seq, captioning, ResNets."""
