"""A trained run in other tools' formats: a Hugging Face Llama directory and a GGUF file
for llama.cpp and Ollama.
"""
