from p2pserve.cli import main

main()
