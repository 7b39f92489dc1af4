"""inference/serve"""
