from dyndepth.cli import main

main()
