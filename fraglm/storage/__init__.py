"""Files written whole or not at all, and directories locked by one process at a time."""
