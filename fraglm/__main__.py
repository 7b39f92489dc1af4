from fraglm.cli.app import command

command()
