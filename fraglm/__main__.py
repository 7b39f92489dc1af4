from fraglm.cli import command

command()
