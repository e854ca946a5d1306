from charon.cli import main

main()
