"""The model: a decoder-only transformer (model.py) read top to bottom, its layers, the KV
cache it decodes with, and the training loss through its head.
"""
