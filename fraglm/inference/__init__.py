"""A trained run answering: sampling token by token with a KV cache, and the OpenAI-
compatible server.
"""
