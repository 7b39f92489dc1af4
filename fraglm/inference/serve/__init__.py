"""``fraglm serve``: a FastAPI app with OpenAI-style routes, their request and response
formats, and the engine that runs generations.
"""
