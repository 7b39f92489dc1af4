"""The ``fraglm`` command line: parse arguments, load the config, call one function.

:mod:`fraglm.cli.app` is the entry point; each command module holds the commands of one
room (training, inference, export, tools) and calls into it.
"""
