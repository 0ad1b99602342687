from lsdc.cli import main

main()
