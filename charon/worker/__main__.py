from charon.worker.main import main

main()
