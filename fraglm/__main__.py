from fraglm.cli import main

main()
