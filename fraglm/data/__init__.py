"""The corpus and what becomes of it: records read and templated, the BPE tokenizer, token
shards on disk, and training windows drawn from them.
"""
